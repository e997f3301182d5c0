"""The teacher service end to end: a real `todi serve` (uvicorn, hf backend, SmolLM2) on
loopback with an API key, driven over HTTP. No mocks: every answer comes from the engine.

Inputs are tiny (a few tokens per sequence, a few dozen rows per job): the machine is shared.
The last test kills the server with SIGKILL mid-job and restarts it on the same storage root.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.tolerance import assert_same_ranking
from todi.storage import collate, content_sample_id, open_shard_set, verify_shard_set
from todi.storage.schema import ARROW_SCHEMA, first_position

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TODI = str(ROOT / ".venv" / "bin" / "todi")
KEY = "test-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {KEY}"}
ARROW = "application/vnd.apache.arrow.stream"

# Server limits, chosen small so the tests can cross them cheaply.
MAX_MODEL_LEN = 64
MAX_SEQS = 8
MAX_TOKENS = 256
MAX_BODY = 32 * 1024
MAX_TOP_K = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`todi serve` as a real subprocess; restartable on the same storage root."""

    def __init__(self, teacher_dir: Path, storage_root: Path, log_path: Path) -> None:
        self.teacher_dir = teacher_dir
        self.storage_root = storage_root
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 420.0) -> None:
        # A restart reuses the port (uvicorn binds with SO_REUSEADDR), so clients follow.
        self.port = self.port or _free_port()
        env = {**os.environ, "TODI_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"}
        # One intra-op thread: on a shared 2-core machine, spinning OpenMP threads that
        # compete with other processes make a forward several times slower.
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [
            TODI,
            "serve",
            "--backend", "hf",
            "--model", str(self.teacher_dir),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-root", str(self.storage_root),
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-top-k", str(MAX_TOP_K),
            "--max-sequences-per-request", str(MAX_SEQS),
            "--max-tokens-per-request", str(MAX_TOKENS),
            "--max-body-bytes", str(MAX_BODY),
            "--max-concurrent-jobs", "1",
            "--batch-window-ms", "20",
            "--log-level", "warning",
        ]  # fmt: skip
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it
        log.write(f"\n--- start {self.starts} ---\n")
        log.flush()
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"todi serve exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"todi serve not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=300.0, **kw)


@pytest.fixture(scope="module")
def server(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("api")
    srv = Server(teacher_dir, base / "storage", base / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def hf_model(teacher_dir: Path):
    """An independent transformers forward (float32), not the service's code path."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    yield model
    del model


def reference_topk(model, ids: list[int], k: int, temperature: float = 1.0):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see Server.start: faster on a busy shared machine
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits / temperature, dim=-1)
            vals, idx = torch.topk(lp, k, dim=-1)
    finally:
        torch.set_num_threads(threads)
    return idx.numpy(), vals.numpy()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WORDS = (  # noqa: SIM905 - one line of words reads better than a list
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike"
).split()


def text_rows(n: int, prefix: str) -> list[dict]:
    return [
        {"id": f"{prefix}-{i}", "text": f"{WORDS[i % len(WORDS)]} {i} {WORDS[(i * 7) % 13]}."}
        for i in range(n)
    ]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_job(client: httpx.Client, job_id: str, until=None, timeout: float = 600.0) -> dict:
    """Poll a job until it leaves queued/running (or `until(progress)` holds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        p = r.json()
        if until is not None and until(p):
            return p
        if p["state"] not in ("queued", "running"):
            return p
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {p['state']} after {timeout}s: {p}")


SEQS = [[504, 3575, 282, 4649, 314, 7042], [1, 9690, 42, 17, 1012], [28, 29, 30]]


# ---------------------------------------------------------------------------------------
def test_healthz_docs_openapi(client: httpx.Client) -> None:
    r = client.get("/healthz", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/v1/logprobs", "/v1/teacher", "/v1/jobs", "/v1/jobs/{job_id}", "/metrics"):
        assert path in spec["paths"], path
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_auth_required_on_every_v1_route(server: Server) -> None:
    routes = [
        ("GET", "/v1/teacher", None),
        ("POST", "/v1/logprobs", {"input_ids": SEQS[:1], "top_k": 2}),
        ("GET", "/v1/jobs", None),
        ("POST", "/v1/jobs", {"dataset": "x.jsonl", "out": "x", "top_k": 2}),
        ("GET", "/v1/jobs/nope", None),
        ("DELETE", "/v1/jobs/nope", None),
    ]
    bad_headers = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": KEY},
    ]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for method, path, body in routes:
            for headers in bad_headers:
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert "detail" in r.json() and r.headers["www-authenticate"] == "Bearer"
        # Rejected before the body is even parsed.
        r = c.post(
            "/v1/logprobs", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 401
        assert c.get("/v1/teacher", headers=AUTH).status_code == 200


def test_teacher_info(client: httpx.Client, teacher_tokenizer) -> None:
    from todi.storage.fingerprints import tokenizer_fingerprint

    info = client.get("/v1/teacher").json()
    assert info["backend"] == "hf"
    assert info["vocab_size"] == 49152
    assert info["tokenizer_sha256"] == tokenizer_fingerprint(teacher_tokenizer)
    assert info["max_top_k"] == MAX_TOP_K and info["max_model_len"] == MAX_MODEL_LEN
    assert info["model"]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logprobs_equal_independent_transformers_forward(
    client: httpx.Client, hf_model, temperature: float
) -> None:
    k = 5
    r = client.post(
        "/v1/logprobs", json={"input_ids": SEQS, "top_k": k, "temperature": temperature}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["top_k"] == k and body["temperature"] == temperature and body["model"]
    assert len(body["results"]) == len(SEQS)
    for seq, res in zip(SEQS, body["results"], strict=True):
        assert res["input_ids"] == seq
        ids = np.asarray(res["topk_ids"])
        lps = np.asarray(res["topk_logprobs"], dtype=np.float32)
        assert ids.shape == lps.shape == (len(seq) - 1, k)
        ref_ids, ref_lps = reference_topk(hf_model, seq, k, temperature)
        assert_same_ranking(ids, lps, ref_ids, ref_lps, tol=1e-3)
        np.testing.assert_allclose(lps, ref_lps, atol=1e-3, rtol=0)
        assert (np.diff(lps, axis=1) <= 0).all()  # rank order


def test_arrow_stream_equals_json(client: httpx.Client) -> None:
    body = {"input_ids": SEQS, "top_k": 4, "temperature": 1.5}
    js = client.post("/v1/logprobs", json=body).json()
    r = client.post("/v1/logprobs", json=body, headers={"Accept": ARROW})
    assert r.status_code == 200 and r.headers["content-type"] == ARROW
    table = pa.ipc.open_stream(io.BytesIO(r.content)).read_all()
    assert table.schema.names == ARROW_SCHEMA.names  # the shard schema's columns
    assert table.schema.field("topk_ids").type == pa.list_(pa.list_(pa.int32()))
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32()))
    meta = json.loads(table.schema.metadata[b"todi"])
    assert (meta["top_k"], meta["temperature"], meta["model"]) == (4, 1.5, js["model"])
    rows = table.to_pylist()
    assert len(rows) == len(js["results"])
    for row, res in zip(rows, js["results"], strict=True):
        assert row["sample_id"] == content_sample_id(res["input_ids"])
        assert row["input_ids"] == res["input_ids"] and row["prompt_len"] == 0
        assert row["topk_ids"] == res["topk_ids"]
        np.testing.assert_array_equal(
            np.asarray(row["topk_logprobs"], np.float32),
            np.asarray(res["topk_logprobs"], np.float32),
        )


def test_texts_are_tokenized_by_the_teacher(client: httpx.Client, teacher_tokenizer) -> None:
    texts = ["The capital of France is Paris", "Hello there"]
    r = client.post("/v1/logprobs", json={"texts": texts, "top_k": 1})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for text, res in zip(texts, results, strict=True):
        assert res["input_ids"] == teacher_tokenizer(text)["input_ids"]
        assert len(res["topk_ids"]) == len(res["input_ids"]) - 1
    paris = teacher_tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    assert results[0]["topk_ids"][-1][0] == paris  # after "... is": " Paris"


BAD_INPUTS = [
    # (body, field the 422 must name)
    (b"{not json", "body"),
    (b"", "body"),
    (b"[1, 2]", "body"),
    (b"null", "body"),
    ({"input_ids": SEQS[:1]}, "top_k"),
    ({"top_k": 2}, "input_ids"),
    ({"input_ids": SEQS[:1], "texts": ["a b"], "top_k": 2}, "input_ids"),
    ({"input_ids": [], "top_k": 2}, "input_ids"),
    ({"texts": [], "top_k": 2}, "texts"),
    ({"input_ids": [[]], "top_k": 2}, "input_ids[0]"),
    ({"input_ids": [[5]], "top_k": 2}, "input_ids[0]"),
    ({"input_ids": "1 2 3", "top_k": 2}, "input_ids"),
    ({"input_ids": [1, 2, 3], "top_k": 2}, "input_ids[0]"),
    ({"input_ids": [[1, "2"]], "top_k": 2}, "input_ids[0][1]"),
    ({"input_ids": [[1, 2.5]], "top_k": 2}, "input_ids[0][1]"),
    ({"input_ids": [[1, None]], "top_k": 2}, "input_ids[0][1]"),
    ({"input_ids": [[[1, 2]]], "top_k": 2}, "input_ids[0][0]"),
    ({"input_ids": [[1, 49152]], "top_k": 2}, "input_ids[0][1]"),
    ({"input_ids": [[3, 4, -1]], "top_k": 2}, "input_ids[0][2]"),
    ({"input_ids": [[1, 10**30]], "top_k": 2}, "input_ids[0]"),
    ({"input_ids": SEQS[:1], "top_k": 0}, "top_k"),
    ({"input_ids": SEQS[:1], "top_k": -3}, "top_k"),
    ({"input_ids": SEQS[:1], "top_k": MAX_TOP_K + 1}, "top_k"),
    ({"input_ids": SEQS[:1], "top_k": 10**40}, "top_k"),
    ({"input_ids": SEQS[:1], "top_k": "5"}, "top_k"),
    ({"input_ids": SEQS[:1], "top_k": 2.0}, "top_k"),
    ({"input_ids": SEQS[:1], "top_k": True}, "top_k"),
    ({"input_ids": SEQS[:1], "top_k": 2, "temperature": 0}, "temperature"),
    ({"input_ids": SEQS[:1], "top_k": 2, "temperature": -1.0}, "temperature"),
    ({"input_ids": SEQS[:1], "top_k": 2, "temperature": "hot"}, "temperature"),
    (b'{"input_ids": [[1, 2]], "top_k": 2, "temperature": 1e400}', "temperature"),
    (b'{"input_ids": [[1, 2]], "top_k": 2, "temperature": NaN}', "temperature"),
    ({"input_ids": [[1] * (MAX_MODEL_LEN + 1)], "top_k": 2}, "input_ids[0]"),
    ({"texts": ["ok text", 7], "top_k": 2}, "texts[1]"),
    ({"texts": ["x"], "top_k": 2}, "texts[0]"),
    ({"texts": ["word " * (MAX_MODEL_LEN + 5)], "top_k": 2}, "texts[0]"),
    ({"input_ids": SEQS[:1], "top_k": 2, "extra": 1}, "extra"),
]


@pytest.mark.parametrize(
    "body,field", BAD_INPUTS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_422_naming_the_field(client: httpx.Client, body, field: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/logprobs", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"] == field, err
    assert err["detail"].startswith(field), err


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_FUZZ_BODY = st.fixed_dictionaries(
    {},
    optional={
        "input_ids": _JSON | st.lists(st.lists(st.integers(-3, 50_000), max_size=6), max_size=3),
        "texts": _JSON | st.lists(st.text(max_size=24), max_size=3),
        "top_k": _JSON | st.integers(-2, MAX_TOP_K + 2),
        "temperature": _JSON | st.floats(-1, 3),
        "junk": _JSON,
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_FUZZ_BODY)
def test_fuzzed_bodies_never_break_the_server(client: httpx.Client, body: dict) -> None:
    """Random JSON in every field: 200, 413 or 422 naming a field; never a 5xx."""
    r = client.post(
        "/v1/logprobs",
        content=json.dumps(body).encode(),  # NaN / Infinity included, as Python writes them
        headers={"content-type": "application/json"},
    )
    assert r.status_code in (200, 413, 422), (body, r.status_code, r.text)
    data = r.json()
    if r.status_code == 200:
        for res in data["results"]:
            n = len(res["input_ids"]) - 1
            assert len(res["topk_ids"]) == len(res["topk_logprobs"]) == n
    else:
        assert data["detail"].startswith(data["field"]), data


def test_limits_are_413_with_json(client: httpx.Client) -> None:
    r = client.post("/v1/logprobs", json={"input_ids": [[1, 2]] * (MAX_SEQS + 1), "top_k": 1})
    assert r.status_code == 413 and r.json()["field"] == "input_ids"
    assert "max_sequences_per_request" in r.json()["detail"]
    seqs = [[7] * 40] * 7  # 280 tokens > MAX_TOKENS, 7 sequences <= MAX_SEQS
    r = client.post("/v1/logprobs", json={"input_ids": seqs, "top_k": 1})
    assert r.status_code == 413 and "max_tokens_per_request" in r.json()["detail"]
    r = client.post("/v1/logprobs", json={"texts": ["x" * 40] * 9, "top_k": 1})
    assert r.status_code == 413 and r.json()["field"] == "texts"
    # Declared body size over the limit.
    big = json.dumps({"input_ids": [[1, 2]], "top_k": 1, "pad": "x" * MAX_BODY}).encode()
    r = client.post("/v1/logprobs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    # Streamed (chunked, no Content-Length) body over the limit.
    chunks = (b" " * 4096 for _ in range(MAX_BODY // 4096 + 2))
    r = client.post("/v1/logprobs", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200


def test_server_survives_garbage(server: Server, client: httpx.Client) -> None:
    garbage = [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"\x00\xff" * 100,
    ]
    for payload in garbage:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)
    deep = b"[" * 5000 + b"]" * 5000
    r = client.post("/v1/logprobs", content=deep, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    r = client.post(
        "/v1/logprobs", content=b"\xff\xfe", headers={"content-type": "application/json"}
    )
    assert r.status_code in (400, 422)
    r = client.post(
        "/v1/logprobs",
        json={"input_ids": SEQS[:1], "top_k": 1},
        headers={"content-type": "text/plain"},
    )
    assert r.status_code in (200, 422)
    assert client.get("/v1/jobs/%00").status_code in (404, 422)
    assert server.proc.poll() is None
    assert client.get("/healthz").status_code == 200


def test_concurrent_requests_are_batched(client: httpx.Client, server: Server, hf_model) -> None:
    """N clients at once: fewer than N engine calls, and every answer is still exact."""
    n = 8
    seqs = [[100 + i, 200 + 3 * i, 300 + 5 * i, 400 + i][: 2 + i % 3] for i in range(n)]
    ks = [1 + i % 4 for i in range(n)]
    before = client.get("/metrics").text
    barrier = threading.Barrier(n)
    answers: list[dict | None] = [None] * n

    def call(i: int) -> None:
        with server.client() as c:
            barrier.wait()
            r = c.post("/v1/logprobs", json={"input_ids": [seqs[i]], "top_k": ks[i]})
            answers[i] = r.json() if r.status_code == 200 else {"error": r.text}

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    after = client.get("/metrics").text
    calls = metric(after, "todi_engine_calls_total") - metric(before, "todi_engine_calls_total")
    gathered = metric(after, "todi_engine_batch_items_sum") - metric(
        before, "todi_engine_batch_items_sum"
    )
    assert gathered == n
    assert calls < n, f"{n} concurrent requests took {calls} engine calls"
    for i, ans in enumerate(answers):
        assert ans is not None and "results" in ans, ans
        res = ans["results"][0]
        ref_ids, ref_lps = reference_topk(hf_model, seqs[i], ks[i])
        got_lps = np.asarray(res["topk_logprobs"])
        assert_same_ranking(res["topk_ids"], got_lps, ref_ids, ref_lps, tol=1e-3)
        np.testing.assert_allclose(got_lps, ref_lps, atol=1e-3)


def test_metrics(client: httpx.Client, server: Server) -> None:
    client.get("/v1/teacher")
    httpx.get(f"{server.url}/v1/teacher")  # 401
    text = client.get("/metrics").text
    assert metric(text, "todi_http_requests_total", route="/v1/logprobs", status="200") >= 1
    assert metric(text, "todi_http_requests_total", route="/v1/logprobs", status="422") >= 1
    assert metric(text, "todi_http_requests_total", route="/v1/logprobs", status="413") >= 1
    assert metric(text, "todi_http_requests_total", route="/v1/teacher", status="401") >= 1
    assert metric(text, "todi_http_request_duration_seconds_count", route="/v1/logprobs") >= 1
    assert metric(text, "todi_engine_tokens_total", source="request") > 0
    for name in (
        "todi_engine_queue_depth",
        "todi_engine_tokens_per_second",
        "todi_engine_batch_items_count",
        "todi_engine_call_seconds_count",
        "todi_jobs",
    ):
        assert f"\n{name}" in text, name


def test_precompute_job_via_rest(client: httpx.Client, server: Server, tmp_path: Path) -> None:
    rows = [
        *text_rows(6, "t"),
        {"id": "pr-0", "prompt": "Say hi.", "response": "Hi!"},
        {"id": "pr-1", "prompt": "Two plus two?", "response": "Four."},
        {"id": "chat-0", "messages": [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
        ]},
        {"id": "empty", "text": "   "},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    spec = {"dataset": str(data), "out": "sets/rest", "top_k": 4, "positions_per_shard": 40}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["out"] == str(server.storage_root / "sets" / "rest")
    p = wait_job(client, job["job_id"])
    assert p["state"] == "succeeded", p
    assert p["sequences_done"] == p["sequences_total"] == 9
    assert p["tokens_done"] == p["tokens_total"] > 0
    assert p["tokens_per_second"] > 0 and p["eta_seconds"] == 0
    assert p["empty_rows"] == 1 and p["error"] is None
    listed = client.get("/v1/jobs").json()["jobs"]
    assert job["job_id"] in [j["job_id"] for j in listed]

    out = server.storage_root / "sets" / "rest"
    assert verify_shard_set(out).ok
    shard_set = open_shard_set(out)
    assert shard_set.complete and shard_set.signature.top_k == 4
    samples = {s.sample_id: s for s in shard_set}
    assert set(samples) == {r["id"] for r in rows if r["id"] != "empty"}
    assert samples["pr-0"].prompt_len > 0
    # The stored rows are the service's answer for the same tokens, from first_position on
    # (log-probs quantized by the codec to 1/32 nat).
    for sid in ("t-0", "pr-0"):
        s = samples[sid]
        ans = client.post(
            "/v1/logprobs", json={"input_ids": [s.input_ids.tolist()], "top_k": 4}
        ).json()["results"][0]
        fp = first_position(s.prompt_len)
        np.testing.assert_array_equal(s.topk_ids, np.asarray(ans["topk_ids"])[fp:])
        np.testing.assert_allclose(
            s.topk_logprobs, np.asarray(ans["topk_logprobs"])[fp:], atol=1 / 64 + 1e-6
        )
    text = client.get("/metrics").text
    assert metric(text, "todi_job_sequences_done", job_id=job["job_id"]) == 9
    assert metric(text, "todi_engine_tokens_total", source="job") > 0


def test_sampled_job_via_rest(client: httpx.Client, server: Server, tmp_path: Path) -> None:
    """The REST job body takes the sampled targets and the re-tempering grid; the set is what
    the in-process job writes (draws reproducible from the seed and sample ids)."""
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(4, "smp"))
    spec = {"dataset": str(data), "out": "sets/sampled", "top_k": 2, "targets": "sampled",
            "draws": 12, "sample_seed": 3, "retemper": [2.0],
            "positions_per_shard": 40}  # fmt: skip
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    assert wait_job(client, r.json()["job_id"])["state"] == "succeeded"
    s = open_shard_set(server.storage_root / "sets" / "sampled")
    sig = s.signature
    assert (sig.targets, sig.top_k, sig.draws, sig.sample_seed) == ("sampled", 2, 12, 3)
    assert sig.retemper_temperatures == (2.0,) and sig.candidates is None
    for sample in s:
        assert sample.draws is not None and sample.tail_logz.shape == (sample.num_positions, 1)
        counts = np.add.reduceat(sample.draws.counts, sample.draws.offsets[:-1])
        assert (counts == 12).all()
    batch = collate(list(s), meta=sig, temperature=2.0)
    assert batch.target_weights is not None and batch.target_weights.sum() > 0


def test_job_paths_confined_and_bad_specs(
    client: httpx.Client, server: Server, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(2, "p"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (server.storage_root / "escape").symlink_to(outside, target_is_directory=True)
    base = {"dataset": str(data), "top_k": 2}
    for out in (
        "../x",
        "sets/../../x",
        str(tmp_path / "x"),
        "/etc",
        "escape/x",
        "escape",
        ".",
        "",
        ".todi-jobs/x",
        "s3://bucket/x",
    ):
        r = client.post("/v1/jobs", json={**base, "out": out})
        assert r.status_code in (400, 422), (out, r.text)
        assert r.json()["field"] == "out", (out, r.json())
        if out not in ("",):
            assert r.status_code == 400, (out, r.text)
    assert not any(outside.iterdir())
    bad = [
        ({**base, "dataset": str(tmp_path / "missing.jsonl"), "out": "m"}, "dataset"),
        ({**base, "out": "k", "top_k": MAX_TOP_K + 1}, "top_k"),
        ({**base, "out": "k", "top_k": 0}, "top_k"),
        ({**base, "out": "t", "temperature": 0}, "temperature"),
        ({**base, "out": "t", "temperature": "x"}, "temperature"),
        ({**base, "out": "u", "unknown": 1}, "unknown"),
        ({"out": "u", "top_k": 2}, "dataset"),
        ({**base, "out": "j", "job_id": "../../etc"}, "job_id"),
        ({**base, "out": "s", "targets": "sampled"}, "draws"),
        ({**base, "out": "s", "draws": 4}, "draws"),
        ({**base, "out": "s", "targets": "rumours", "draws": 4}, "targets"),
        ({**base, "out": "s", "targets": "sampled", "draws": 256}, "draws"),
        ({**base, "out": "s", "retemper": [2, 2]}, "retemper"),
        ({**base, "out": "s", "retemper": [0]}, "retemper"),
    ]
    for body, field in bad:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["field"] == field, (body, r.json())
    for method in ("GET", "DELETE"):
        r = client.request(method, "/v1/jobs/job-doesnotexist")
        assert r.status_code == 404 and r.json()["field"] == "job_id"


def test_cli_precompute_via_server(server: Server, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(5, "cli"))
    cmd = [
        TODI, "precompute", "--server", server.url, "--dataset", str(data),
        "--out", "sets/cli", "--top-k", "3", "--temperature", "2.0", "--max-seq-len", "6",
        "--poll", "0.2",
    ]  # fmt: skip
    env = {**os.environ, "TODI_API_KEY": KEY}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["state"] == "succeeded" and final["sequences_done"] == 5
    assert "seq" in proc.stderr and "5/5" in proc.stderr  # the tqdm bar reached the end
    out = server.storage_root / "sets" / "cli"
    s = open_shard_set(out)
    assert s.complete and len(s) == 5 and s.signature.temperature == 2.0
    assert max(len(x.input_ids) for x in s) <= 6


def test_job_cancel_resubmit_kill9_restart_exactly_once(
    client: httpx.Client, server: Server, tmp_path: Path
) -> None:
    """One job through its whole life: cancel (a valid partial set), re-submit (resumes),
    SIGKILL of the server mid-run, a new server on the same storage root finishes it, and
    every sample ends up in the set exactly once."""
    rows = text_rows(30, "c")
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    spec = {
        "dataset": str(data),
        "out": "sets/life",
        "top_k": 3,
        "batch_tokens": 8,  # one row per engine call
        "positions_per_shard": 4,  # a shard per call
    }
    out = server.storage_root / "sets" / "life"
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    # One job may be active at a time (max_concurrent_jobs=1): a second one is refused.
    r = client.post("/v1/jobs", json={**spec, "out": "sets/other"})
    assert r.status_code == 429, r.text
    assert "max" in r.json()["detail"]

    # 1. cancel mid-way: the whole shards written so far are a valid, incomplete set.
    p = wait_job(client, job_id, until=lambda p: p["shards"] >= 1)
    assert p["state"] == "running", p
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200
    p = wait_job(client, job_id)
    assert p["state"] == "cancelled", p
    report = verify_shard_set(out)
    assert report.ok, report.problems
    partial = open_shard_set(out)
    assert not partial.complete
    cancelled_ids = [s.sample_id for s in partial]
    assert 0 < len(cancelled_ids) < len(rows)
    assert len(cancelled_ids) == len(set(cancelled_ids))

    # 2. re-submitting the same job resumes it (same id); 3. SIGKILL the server mid-run.
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202 and r.json()["job_id"] == job_id
    p = wait_job(
        client,
        job_id,
        until=lambda p: (
            p["state"] == "running"
            and p["resumed_sequences"] == len(cancelled_ids)
            and p["sequences_done"] >= len(cancelled_ids) + 2
        ),
    )
    assert p["state"] == "running", p
    server.kill9()
    before = open_shard_set(out)
    assert not before.complete and verify_shard_set(out).ok
    done_before = len(before)
    assert len(cancelled_ids) < done_before < len(rows)

    # 4. a new server on the same storage root resumes the job by itself.
    server.start()
    p = wait_job(client, job_id)
    assert p["state"] == "succeeded", (p, server.log_tail())
    assert p["resumed_sequences"] == done_before
    assert math.isfinite(p["tokens_per_second"]) and p["tokens_per_second"] > 0
    final = open_shard_set(out)
    report = verify_shard_set(out)
    assert final.complete and report.ok, report.problems
    ids = [s.sample_id for s in final]
    assert len(ids) == len(set(ids)) == len(rows)
    assert set(ids) == {r["id"] for r in rows}


def test_sigterm_shuts_down_cleanly(server: Server) -> None:
    assert server.proc is not None and server.proc.poll() is None
    server.proc.send_signal(signal.SIGTERM)
    # Graceful: the lifespan shuts jobs and engine down, then uvicorn re-raises SIGTERM
    # (so the exit status is that of SIGTERM, as for any server killed politely).
    assert server.proc.wait(90) in (0, -signal.SIGTERM), server.log_tail()
    assert "Traceback" not in server.log_path.read_text(), server.log_tail()
