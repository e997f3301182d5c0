"""The Docker Compose stack, built and run the way a user runs it (docker/README.md).

One module-scoped stack (the module runs first: see conftest.py, so no other engine or Ray
cluster of the session competes for the host's ports and cores):
- the images are built from the wheelhouse and a local base image (`docker/build-images.sh`,
  what `make images` runs), on a Docker engine that `.ci/docker-engine.sh` starts when none
  runs;
- `up -d --scale ray-worker=2` with `docker/compose.host-network.yml` (this machine's engine has
  no bridge network), then the health checks;
- the README's pipeline through the one-shot services: `prepare`, `precompute` (a job over REST
  with TODI_API_KEY), `train` through the Ray client, `train` again as a Ray job
  (`ray job submit` to the head's job API), `eval`; a `--ray` precompute whose vLLM teacher
  actors run on the stack's Ray worker nodes; REST from the host; the student loaded with
  transformers; the teacher's health when its engine dies; `down -v`.
Placement is read from Ray's own records (the state API on the head's dashboard).
A failure names the service and prints its last log lines. Nothing here is skipped: without
an engine the set-up fails and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = "/usr/bin/docker"  # Debian's CLI, which matches the Debian engine
COMPOSE_FILES = ("docker-compose.yml", "docker/compose.host-network.yml")
PROJECT = "todi-stack-test"
API_KEY = "compose-test-key"
MODEL = "/data/todi/models/smollm2-135m-instruct"
BUILD_TIMEOUT = 2400
UP_TIMEOUT = 900

pytestmark = [pytest.mark.slow, pytest.mark.compose, pytest.mark.timeout(5400)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    env: dict[str, str]
    ports: dict[str, int]
    tmp: Path
    compose_file: Path
    started_engine: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    # -- commands --------------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        argv = ["docker-compose", "-f", str(self.compose_file), "--project-directory", str(ROOT),
                "-p", PROJECT]  # fmt: skip
        proc = subprocess.run(
            [*argv, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            service = next((a for a in args if a in SERVICES), None)
            self.fail(f"`docker-compose {' '.join(args)}` exited {proc.returncode}:\n"
                      f"{_tail(proc.stdout + proc.stderr)}", service)  # fmt: skip
        return proc

    def run_job(self, service: str, *command: str, timeout: float = 900) -> str:
        """`docker compose run --rm SERVICE [command]`; its output."""
        proc = self.compose("run", "--rm", "-T", service, *command, timeout=timeout, check=False)
        if proc.returncode != 0:
            self.fail(
                f"one-shot service `{service}` exited {proc.returncode}:\n"
                f"{_tail(proc.stdout + proc.stderr, 60)}",
                None,
            )
        return proc.stdout

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.split()
        if not cid:
            self.fail(f"service `{service}` has no container", service)
        return cid[0]

    def docker(self, *args: str, timeout: float = 300, check: bool = True):
        proc = subprocess.run(
            [DOCKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            self.fail(f"`docker {' '.join(args)}` exited {proc.returncode}: {_tail(proc.stderr)}")
        return proc

    def logs(self, service: str, lines: int = 40) -> str:
        proc = self.compose("logs", "--no-color", "--tail", str(lines), service, check=False)
        return proc.stdout + proc.stderr

    def fail(self, message: str, service: str | None = None) -> None:
        names = [service] if service else list(DEFAULT_SERVICES)
        logs = "\n".join(f"--- last log lines of `{s}` ---\n{self.logs(s)}" for s in names)
        pytest.fail(f"{message}\n{logs}", pytrace=False)

    # -- the stack's own interfaces ---------------------------------------------------------
    @property
    def teacher_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['TEACHER_PORT']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['RAY_DASHBOARD_PORT']}"

    def http(self, method: str, path: str, body: Any = None, key: str | None = API_KEY):
        """(status, JSON body) of a request to the teacher's published port."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.teacher_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def ray_state(self, kind: str, **filters: str) -> list[dict[str, Any]]:
        """Ray's own records (state API, through the head's dashboard)."""
        from ray.util import state

        lister = {"nodes": state.list_nodes, "actors": state.list_actors}[kind]
        return [
            s if isinstance(s, dict) else s.__dict__
            for s in lister(
                address=self.dashboard_url,
                filters=[(k, "=", v) for k, v in filters.items()],
                detail=True,
                limit=10_000,
                raise_on_missing_output=False,
            )
        ]

    def health(self, service: str) -> str:
        cid = self.container(service)
        out = self.docker("inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", cid)
        return out.stdout.strip()

    def copy_in(self, src: Path, service: str, dest: str) -> None:
        self.docker("cp", str(src), f"{self.container(service)}:{dest}")

    def copy_out(self, service: str, src: str, dest: Path) -> None:
        self.docker("cp", f"{self.container(service)}:{src}", str(dest))


SERVICES = {"teacher-cpu", "ray-head", "ray-worker", "prepare", "precompute", "train", "eval"}
DEFAULT_SERVICES = ("teacher-cpu", "ray-head", "ray-worker")


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(argv)}` exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}",
            pytrace=False,
        )
    return proc.stdout


def _dataset(path: Path, rows: int, offset: int) -> Path:
    """JSONL rows of chatterbot-corpus prompt/response pairs (the package the demo uses)."""
    from todi.services.answers import chatterbot_prompts

    prompts = chatterbot_prompts()
    with path.open("w") as f:
        for i in range(rows):
            a, b = prompts[offset + 2 * i], prompts[offset + 2 * i + 1]
            f.write(json.dumps({"id": f"row-{offset + i}", "prompt": a, "response": b}) + "\n")
    return path


def _host_network_file(env: dict[str, str], dest: Path) -> Path:
    """docker-compose.yml + docker/compose.host-network.yml, merged by compose itself, less
    the published ports: compose 1.29 refuses `ports` next to `network_mode: host` (moot there:
    each service listens on the host's own port) and an override file cannot remove a key."""
    import yaml

    argv = ["docker-compose", *(a for f in COMPOSE_FILES for a in ("-f", f))]
    merged = yaml.safe_load(_run([*argv, "--profile", "jobs", "config"], timeout=120, env=env))
    for svc in merged["services"].values():
        if svc.get("network_mode") == "host":
            svc.pop("ports", None)
    dest.write_text(yaml.safe_dump(merged, sort_keys=False))
    return dest


def _wait_healthy(stack: Stack, timeout: float) -> None:
    """Every default service's containers report `healthy` (the compose health checks)."""
    deadline = time.monotonic() + timeout
    status: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        status = {}
        for service in DEFAULT_SERVICES:
            ids = stack.compose("ps", "-q", service).stdout.split()
            status[service] = [
                stack.docker(
                    "inspect", "-f", "{{.State.Status}}/{{.State.Health.Status}}", c
                ).stdout.strip()
                for c in ids
            ]
        bad = [s for s, v in status.items() if any(x.startswith(("exited", "dead")) for x in v)]
        if bad:
            stack.fail(f"service `{bad[0]}` stopped while starting: {status}", bad[0])
        if all(v and all(x == "running/healthy" for x in v) for v in status.values()):
            return
        time.sleep(5)
    unhealthy = next(s for s, v in status.items() if not all(x == "running/healthy" for x in v))
    stack.fail(f"not healthy after {timeout:.0f} s: {status}", unhealthy)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    tmp = tmp_path_factory.mktemp("compose")
    ports = {
        name: _free_port()
        for name in ("TEACHER_PORT", "RAY_GCS_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT")
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "RAY_"))},
        **{k: str(v) for k, v in ports.items()},
        "TODI_API_KEY": API_KEY,
        "IMAGE_TAG": "dev",
        "BASE_IMAGE": "todi-distill/base:bookworm",
        "DOCKER": DOCKER,
        "PIP": f"{sys.executable} -m pip",
        # Sized for a 2-core, 24 GB machine running three vLLM engines at its peak.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TEACHER_SHM_SIZE": "2gb",
        "RAY_SHM_SIZE": "1gb",
        "RAY_OBJECT_STORE_BYTES": "300000000",
        "TRAIN_WORKERS": "2",
        "TRAIN_MAX_STEPS": "3",
    }
    engine = _run(["bash", ".ci/docker-engine.sh", "start"], timeout=120).strip()
    stack = Stack(
        env=env,
        ports=ports,
        tmp=tmp,
        compose_file=_host_network_file(env, tmp / "compose.host.yml"),
        started_engine=engine.endswith("started"),
    )
    try:
        t0 = time.monotonic()
        _run(["bash", "docker/build-images.sh"], timeout=BUILD_TIMEOUT, env=env)
        stack.notes["build_s"] = time.monotonic() - t0
        stack.compose("down", "-v", "--remove-orphans", check=False)  # a stack left by a crash
        t0 = time.monotonic()
        stack.compose("up", "-d", "--no-build", "--scale", "ray-worker=2", timeout=UP_TIMEOUT)
        _wait_healthy(stack, UP_TIMEOUT)
        stack.notes["up_s"] = time.monotonic() - t0
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)
        if stack.started_engine:
            subprocess.run(["bash", ".ci/docker-engine.sh", "stop"], cwd=ROOT, timeout=120)


# ------------------------------------------------------------------------------------------


def test_up_gives_a_healthy_stack_of_three_ray_nodes(stack):
    for service in DEFAULT_SERVICES:
        assert stack.health(service) == "running healthy", service
    assert len(stack.compose("ps", "-q", "ray-worker").stdout.split()) == 2
    nodes = [n for n in stack.ray_state("nodes") if n["state"] == "ALIVE"]
    assert len(nodes) == 3, nodes
    heads = [n for n in nodes if n["is_head_node"]]
    assert len(heads) == 1
    # The head takes no tasks (--num-cpus=0): training and teacher actors go to the workers.
    assert heads[0]["resources_total"].get("CPU", 0) == 0
    stack.notes["head_node"] = heads[0]["node_id"]
    stack.notes["worker_nodes"] = {n["node_id"] for n in nodes if not n["is_head_node"]}


def test_rest_from_the_host(stack):
    status, body = stack.http("GET", "/healthz", key=None)
    assert status == 200 and body["status"] == "ok", body
    status, body = stack.http("GET", "/v1/teacher")
    assert status == 200, body
    assert body["backend"] == "vllm" and body["vocab_size"] >= 49152, body
    status, body = stack.http(
        "POST", "/v1/logprobs", {"texts": ["The capital of France is Paris"], "top_k": 5}
    )
    assert status == 200, body
    result = body["results"][0]
    assert len(result["topk_ids"]) == len(result["input_ids"]) - 1 > 0
    assert all(len(row) == 5 for row in result["topk_ids"])
    assert all(v <= 0.0 for row in result["topk_logprobs"] for v in row)
    status, body = stack.http("GET", "/v1/teacher", key=None)
    assert status == 401, body
    status, body = stack.http("POST", "/v1/logprobs", {"texts": ["x y"], "top_k": 5}, key="no")
    assert status == 401, body


def test_prepare_and_precompute_jobs_over_rest(stack):
    train = _dataset(stack.tmp / "train.jsonl", rows=32, offset=0)
    heldout = _dataset(stack.tmp / "heldout.jsonl", rows=8, offset=100)
    stack.copy_in(train, "teacher-cpu", "/data/datasets/train.jsonl")
    stack.copy_in(heldout, "teacher-cpu", "/data/datasets/heldout.jsonl")
    stack.run_job("prepare")
    out = stack.run_job("precompute")  # the service's default command
    final = json.loads(out.strip().splitlines()[-1])
    assert final["state"] == "succeeded" and final["sequences_done"] == 32, final
    stack.run_job(
        "precompute", "todi", "precompute", "--dataset", "/data/datasets/heldout.jsonl",
        "--out", "/data/shards/heldout", "--top-k", "20", "--no-progress",
        "--server", f"http://teacher-cpu:{stack.ports['TEACHER_PORT']}",
    )  # fmt: skip
    verified = stack.run_job("train", "todi", "shards", "verify", "/data/shards/train")
    assert verified.startswith("ok:"), verified


def _train_workers(stack: Stack) -> list[dict[str, Any]]:
    return stack.ray_state("actors", class_name="RayTrainWorker")


def _assert_spread_over_workers(stack: Stack, actors: list[dict[str, Any]], n: int) -> None:
    nodes = {a["node_id"] for a in actors}
    assert len(actors) >= n, actors
    assert stack.notes["head_node"] not in nodes, "a training worker ran on the head"
    assert nodes <= stack.notes["worker_nodes"]
    assert len(nodes) == n, f"{n} workers on {len(nodes)} node(s): {nodes}"


def test_train_through_the_ray_client_spreads_over_worker_nodes(stack):
    before = {a["actor_id"] for a in _train_workers(stack)}
    out = stack.run_job("train", timeout=1800)  # --ray-address ray://ray-head:PORT
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert summary["steps"] == 3, summary
    workers = [a for a in _train_workers(stack) if a["actor_id"] not in before]
    _assert_spread_over_workers(stack, workers, 2)


def test_train_as_a_ray_job(stack):
    """`ray job submit` to the head's job API, from the host: what a Ray user runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    before = {a["actor_id"] for a in _train_workers(stack)}
    ray_cli = str(Path(sys.executable).parent / "ray")
    entrypoint = [
        "todi", "train", "--shards", "/data/shards/train",
        "--student", f"init:teacher={MODEL},layers=2", "--out", "/data/runs/student-job",
        "--workers", "2", "--placement-strategy", "SPREAD", "--max-steps", "2",
        "--ray-address", "auto",
    ]  # fmt: skip
    proc = subprocess.run(
        [ray_cli, "job", "submit", "--address", stack.dashboard_url,
         "--submission-id", "todi-train-job", "--", *entrypoint],
        capture_output=True, text=True, timeout=1800, env=stack.env,
    )  # fmt: skip
    client = JobSubmissionClient(stack.dashboard_url)
    status = client.get_job_status("todi-train-job")
    if proc.returncode != 0 or status != JobStatus.SUCCEEDED:
        stack.fail(
            f"ray job ended {status} (exit {proc.returncode}):\n"
            f"{_tail(client.get_job_logs('todi-train-job'), 40)}\n{_tail(proc.stderr)}",
            "ray-head",
        )
    job = client.get_job_info("todi-train-job")
    # The job's driver ran on the head; its workers on the two worker nodes.
    assert job.driver_node_id == stack.notes["head_node"]
    workers = [a for a in _train_workers(stack) if a["actor_id"] not in before]
    _assert_spread_over_workers(stack, workers, 2)
    assert all(a["job_id"] == workers[0]["job_id"] for a in workers)


def test_eval_job(stack):
    stack.run_job("eval", timeout=900)  # --student /data/runs/student/model
    report = stack.tmp / "eval.json"
    stack.copy_out("teacher-cpu", "/data/runs/student/eval.json", report)
    metrics = json.loads(report.read_text())
    assert metrics, metrics


def test_ray_precompute_runs_teacher_actors_on_worker_nodes(stack):
    spec = {
        "dataset": "train.jsonl", "out": "train-ray", "top_k": 20, "ray": True,
        "num_actors": 2, "positions_per_shard": 64, "job_id": "ray-capture",
    }  # fmt: skip
    status, body = stack.http("POST", "/v1/jobs", spec)
    assert status == 202, body
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        status, job = stack.http("GET", "/v1/jobs/ray-capture")
        if job.get("state") in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(5)
    if job.get("state") != "succeeded":
        stack.fail(f"--ray precompute job: {job}", "teacher-cpu")
    assert job["sequences_done"] == 32 and job["shards"] >= 2, job
    # Ray's records of the actor pool (class name `MapWorker(MapBatches(TeacherActor))`) and of
    # the job's driver, which runs inside the cluster because the service is a Ray client.
    everything = stack.ray_state("actors")
    actors = [a for a in everything if "TeacherActor" in a["class_name"]]
    assert actors, [a["class_name"] for a in everything]
    assert any(a["class_name"] == "_ClusterDriver" for a in everything)
    nodes = {a["node_id"] for a in actors}
    assert stack.notes["head_node"] not in nodes and nodes <= stack.notes["worker_nodes"], nodes
    stack.notes["teacher_actor_nodes"] = len(nodes)
    verified = stack.run_job("train", "todi", "shards", "verify", "/data/shards/train-ray")
    assert verified.startswith("ok:"), verified


def test_trained_student_loads_with_transformers(stack):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = stack.tmp / "student"
    stack.copy_out("teacher-cpu", "/data/runs/student/model", dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    assert model.config.num_hidden_layers == 10
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape[-1] >= tok.vocab_size and bool(logits.isfinite().all())
    shutil.rmtree(dest)


def test_teacher_health_follows_its_engine(stack):
    """Kill the vLLM engine core inside the teacher container: /healthz says so (503)."""
    killer = (
        "import os, signal\n"
        "me = str(os.getpid())\n"
        "for p in filter(str.isdigit, os.listdir('/proc')):\n"
        "    if p == me:\n"
        "        continue\n"
        "    try:\n"
        "        cmd = open(f'/proc/{p}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if b'EngineCore' in cmd:\n"
        "        os.kill(int(p), signal.SIGKILL); print(p)\n"
    )
    out = stack.docker("exec", stack.container("teacher-cpu"), "python3", "-c", killer)
    assert out.stdout.split(), "no vLLM engine core process found in the teacher container"
    deadline = time.monotonic() + 60
    status, body = 200, None
    while time.monotonic() < deadline:
        status, body = stack.http("GET", "/healthz", key=None)
        if status == 503:
            break
        time.sleep(1)
    assert status == 503 and "engine" in body["detail"], body


def test_down_removes_every_container_network_and_volume(stack):
    stack.compose("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={PROJECT}"
    assert stack.docker("ps", "-aq", "--filter", label).stdout.split() == []
    assert stack.docker("network", "ls", "-q", "--filter", label).stdout.split() == []
    assert stack.docker("volume", "ls", "-q", "--filter", label).stdout.split() == []
