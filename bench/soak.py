"""Soak: load and crashes against a real `todi serve` (hf backend, SmolLM2-135M, API key).

    python bench/soak.py [--clients 64] [--seconds 20] [--rounds 3] [--kills 8] [--rows 120]

1. Load: one client for `--seconds`, then `--clients` concurrent clients for `--seconds`, for
   `--rounds` rounds: mixed request sizes (token ids and texts, 1-8 sequences of 2-48
   tokens, k 1-16) while one more client polls a job. Reports errors, p50/p99 latency,
   requests/s against the one client, and the server's RSS after each round (flat = no leak).
2. Crashes: a precompute job killed with SIGKILL at `--kills` random instants (uniform over
   the job's expected run time), restarted each time (the server resumes the job by itself);
   records where each kill landed (sequences done, shards committed), then checks every
   sample is in the set exactly once and `verify_shard_set` is clean.

Writes bench/results/soak.json. The machine is shared: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TODI = str(ROOT / ".venv" / "bin" / "todi")
KEY = "soak-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()  # noqa: SIM905


class Server:
    def __init__(self, model: Path, storage: Path, log: Path) -> None:
        self.model, self.storage, self.log = model, storage, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        env = {**os.environ, "TODI_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
        env["TOKENIZERS_PARALLELISM"] = "false"
        cmd = [TODI, "serve", "--backend", "hf", "--model", str(self.model)]
        cmd += ["--port", str(self.port), "--storage-root", str(self.storage)]
        cmd += ["--max-model-len", "64", "--max-top-k", "16", "--log-level", "warning"]
        cmd += ["--batch-window-ms", "5"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill9()


def request_body(rng: random.Random) -> dict:
    n = rng.randint(1, 8)
    k = rng.randint(1, 16)
    if rng.random() < 0.3:
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(2, 20))) for _ in range(n)]
        return {"texts": texts, "top_k": k}
    ids = [[rng.randrange(49152) for _ in range(rng.randint(2, 48))] for _ in range(n)]
    return {"input_ids": ids, "top_k": k, "temperature": rng.choice([1.0, 0.7, 2.0])}


def load_phase(srv: Server, clients: int, seconds: float, seed: int, job_id: str | None):
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=300) as c:
            while time.monotonic() < stop:
                body = request_body(rng)
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/logprobs", json=body)
                    ok = r.status_code == 200
                    why = f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as exc:
                    ok, why = False, repr(exc)
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors.append(why)

    def poller() -> None:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
            while time.monotonic() < stop:
                for path in ("/v1/jobs", f"/v1/jobs/{job_id}" if job_id else "/v1/teacher"):
                    r = c.get(path)
                    if r.status_code != 200:
                        with lock:
                            errors.append(f"poll {path}: {r.status_code}")
                time.sleep(0.2)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=poller))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": errors[:5],
        "requests_per_s": round(len(lat) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
    }


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(7)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choices(WORDS, k=rng.randint(3, 25)))
            f.write(json.dumps({"id": f"row-{i}", "text": f"{i}: {words}"}) + "\n")


def crash_phase(srv: Server, work: Path, kills: int, rows: int, seed: int) -> dict:
    from todi.storage import open_shard_set, verify_shard_set

    data = work / "rows.jsonl"
    write_rows(data, rows)
    body = {"dataset": str(data), "out": "crash-set", "top_k": 8, "positions_per_shard": 64}
    body["batch_tokens"] = 256
    c = httpx.Client(base_url=srv.url, headers=AUTH, timeout=120)
    # The uninterrupted time of the job on this machine, to spread the kills over it.
    t0 = time.monotonic()
    r = c.post("/v1/jobs", json={**body, "out": "timing-set"})
    job = r.json()["job_id"]
    while c.get(f"/v1/jobs/{job}").json()["state"] in ("queued", "running"):
        time.sleep(0.1)
    job_seconds = time.monotonic() - t0
    rng = random.Random(seed)
    landed = []
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    for _ in range(kills):
        # A quarter of the kills land anywhere after a (re)start, the resume scan included;
        # the rest once the job computes again, at a random instant over about two job
        # shares (between, inside or around shard writes and manifest commits).
        phase = "any" if rng.random() < 0.25 else "compute"
        if phase == "compute":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                p = c.get(f"/v1/jobs/{job}").json()
                if p["state"] != "running" or p["sequences_done"] > p["resumed_sequences"]:
                    break
                time.sleep(0.05)
        delay = rng.uniform(0.05, 1.5 * job_seconds / kills)
        time.sleep(delay)
        p = c.get(f"/v1/jobs/{job}").json()
        srv.kill9()
        landed.append(
            {
                "phase": phase,
                "after_s": round(delay, 2),
                "state": p["state"],
                "sequences_done": p.get("sequences_done"),
                "resumed": p.get("resumed_sequences"),
                "shards": p.get("shards"),
            }
        )
        if p["state"] not in ("queued", "running"):
            srv.start()
            break
        srv.start()  # the job resumes by itself
    while (p := c.get(f"/v1/jobs/{job}").json())["state"] in ("queued", "running"):
        time.sleep(0.2)
    ids = [s.sample_id for s in open_shard_set(srv.storage / "crash-set")]
    report = verify_shard_set(srv.storage / "crash-set")
    return {
        "rows": rows,
        "uninterrupted_job_s": round(job_seconds, 2),
        "kills": landed,
        "final_state": p["state"],
        "samples": len(ids),
        "distinct_samples": len(set(ids)),
        "exactly_once": len(ids) == len(set(ids)) == rows,
        "verify_ok": report.ok,
        "verify_warnings": report.warnings,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-load", action="store_true", help="only the crash phase")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = ap.parse_args()

    from todi.services.models import prepare_model

    model = prepare_model("smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="todi-soak-"))
    srv = Server(model, work / "storage", work / "server.log")
    results: dict = {"started_s": round(srv.start(), 1), "load": [], "rss_mb": []}
    try:
        results["rss_mb"].append(round(srv.rss_mb(), 1))
        for rnd in range(0 if args.skip_load else args.rounds):
            one = load_phase(srv, 1, args.seconds, args.seed + rnd, None)
            many = load_phase(srv, args.clients, args.seconds, args.seed + rnd, None)
            many["speedup_vs_one_client"] = round(
                many["requests_per_s"] / max(one["requests_per_s"], 1e-9), 2
            )
            results["load"].append({"round": rnd, "one_client": one, "many_clients": many})
            results["rss_mb"].append(round(srv.rss_mb(), 1))
            print(json.dumps(results["load"][-1]), "rss", results["rss_mb"][-1], flush=True)
        results["crashes"] = crash_phase(srv, work, args.kills, args.rows, args.seed)
        print(json.dumps(results["crashes"]), flush=True)
    finally:
        srv.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    ok = all(
        r["many_clients"]["errors"] == 0 and r["one_client"]["errors"] == 0 for r in results["load"]
    )
    ok = ok and results["crashes"]["exactly_once"] and results["crashes"]["verify_ok"]
    print("soak", "OK" if ok else "FAILED", "->", args.out)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
