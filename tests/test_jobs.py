"""Precompute jobs end to end with the real SmolLM2 teacher (hf backend): shards readable and
verified, resume after cancel, a job killed with SIGKILL then recovered, the JobManager's
path confinement and limits, and the Ray mode with 2 actors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from todi.services.config import JobSpec
from todi.services.jobs import (
    JobConflictError,
    JobLimitError,
    JobManager,
    JobNotFoundError,
    JobPathError,
)
from todi.services.precompute import output_lock, run_precompute
from todi.storage import DEFAULT_CODEC, first_position, open_shard_set, verify_shard_set

REPO = Path(__file__).resolve().parents[1]
TOP_K = 4


def dataset_rows(n: int = 16) -> list[dict]:
    """Short rows of every kind (jobs below run with chat_template=False for the pairs,
    which keeps sequences short; chat rows always use the template)."""
    rows: list[dict] = []
    for i in range(n):
        kind = i % 8
        if kind < 5:
            rows.append({"prompt": f"What is {i} plus {i}? ", "response": f"It is {2 * i}."})
        elif kind < 7:
            rows.append({"text": f"Line {i}: the sun rose over the quiet hills."})
        else:
            rows.append(
                {
                    "id": f"chat-{i}",
                    "messages": [
                        {"role": "user", "content": f"Name animal {i}."},
                        {"role": "assistant", "content": "A cat."},
                    ],
                }
            )
    rows.append({"text": ""})  # an empty row: reported, not fatal
    return rows


def write_dataset(path: Path, n: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in dataset_rows(n)))
    return path


@pytest.fixture(scope="module")
def hf_backend(teacher_dir):
    from todi.services.backends import create_backend

    backend = create_backend("hf", teacher_dir, token_budget=1024)
    yield backend
    backend.close()


def expected_ids(path: Path, backend) -> set[str]:
    from todi.services.datasets import encode_rows, read_rows

    rows = encode_rows(read_rows(path), backend.tokenizer, chat_template=False)
    return {r.sample_id for r in rows}


def check_exactly_once(out: Path, ids: set[str]) -> None:
    report = verify_shard_set(out)
    assert report.ok, report.problems  # also catches a sample id in two shards
    shard_set = open_shard_set(out)
    assert shard_set.complete
    assert report.rows == len(ids) == shard_set.num_rows
    assert shard_set.sample_ids() == ids


@pytest.mark.timeout(300)
def test_job_end_to_end(tmp_path, hf_backend):
    data = write_dataset(tmp_path / "d.jsonl", 8)
    out = tmp_path / "set"
    seen = []
    spec = JobSpec(dataset=str(data), out=str(out), top_k=TOP_K, batch_tokens=60,
                   positions_per_shard=20, chat_template=False, name="e2e")  # fmt: skip
    p = run_precompute(spec, hf_backend, on_progress=seen.append)
    assert p.state == "succeeded"
    ids = expected_ids(data, hf_backend)
    check_exactly_once(out, ids)
    assert p.sequences_done == p.sequences_total == len(ids) == 8
    assert p.tokens_done == p.tokens_total > 0
    assert p.empty_rows == 1 and p.empty_row_numbers == [8]
    assert p.tokens_per_second > 0 and p.eta_seconds == 0.0 and p.shards >= 2
    assert seen[0].sequences_done == 0 and seen[0].tokens_total == p.tokens_total
    assert [s.sequences_done for s in seen] == sorted(s.sequences_done for s in seen)

    shard_set = open_shard_set(out)
    info = hf_backend.info
    meta = shard_set.metadata
    assert meta["teacher_fingerprint"] == info.weights_sha256
    assert meta["tokenizer_sha256"] == info.tokenizer_sha256
    assert (meta["vocab_size"], meta["top_k"], meta["temperature"]) == (info.vocab_size, 4, 1.0)
    assert (meta["backend"], meta["logprobs_mode"], meta["codec"]) == (
        "hf",
        info.logprobs_mode,
        DEFAULT_CODEC,
    )
    job = shard_set.manifest.job
    assert job["dataset"] == str(data) and job["top_k"] == TOP_K and job["name"] == "e2e"
    assert job["stats"]["empty"] == 1

    # Stored rows are rows first_position .. L-2 of the teacher's top-k for the sequence.
    samples = list(shard_set)
    for sample in samples[:3]:
        (direct,) = hf_backend.topk([sample.input_ids], TOP_K)
        fp = first_position(sample.prompt_len)
        np.testing.assert_array_equal(sample.topk_ids[:, 0], direct.ids[fp:, 0])
        np.testing.assert_allclose(sample.topk_logprobs, direct.logprobs[fp:], atol=0.03)
    # And they batch for the trainer.
    batch = next(shard_set.iter_batches(batch_size=4))
    assert batch.topk_ids.shape[-1] == TOP_K


@pytest.mark.timeout(300)
def test_cancel_then_resume_every_sample_once(tmp_path, hf_backend):
    data = write_dataset(tmp_path / "d.jsonl", 16)
    out = tmp_path / "set"
    spec = JobSpec(dataset=str(data), out=str(out), top_k=TOP_K, batch_tokens=40,
                   positions_per_shard=20, chat_template=False)  # fmt: skip
    cancel = threading.Event()

    def stop_after_two_shards(p) -> None:
        if p.shards >= 2:
            cancel.set()

    first = run_precompute(spec, hf_backend, on_progress=stop_after_two_shards, cancel=cancel)
    assert first.state == "cancelled"
    partial = open_shard_set(out)
    assert not partial.complete and 0 < partial.num_rows < 16
    assert verify_shard_set(out).ok
    done_first = partial.num_rows

    second = run_precompute(spec, hf_backend)
    assert second.state == "succeeded"
    assert second.resumed_sequences == done_first
    assert second.sequences_done == second.sequences_total == 16
    ids = expected_ids(data, hf_backend)
    check_exactly_once(out, ids)

    # Idempotent: a third run computes nothing and keeps the set as it is.
    shards = open_shard_set(out).manifest.shards
    third = run_precompute(spec, hf_backend)
    assert third.state == "succeeded" and third.resumed_sequences == 16
    assert open_shard_set(out).manifest.shards == shards
    check_exactly_once(out, ids)

    # Another job may not write into this set: signature or parameters differ.
    with pytest.raises(JobConflictError, match=r"top_k: 4 != 5"):
        run_precompute(spec.model_copy(update={"top_k": 5}), hf_backend)
    with pytest.raises(JobConflictError, match=r"max_seq_len: None != 32"):
        run_precompute(spec.model_copy(update={"max_seq_len": 32}), hf_backend)
    # Nor may two runs write the same set at once (the lock dies with its holder).
    with output_lock(str(out)), pytest.raises(JobConflictError, match="another running job"):
        run_precompute(spec, hf_backend)


def wait_for_shards(manifest: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"job process exited early: {proc.stderr.read().decode()[-2000:]}")
        try:
            if json.loads(manifest.read_text())["shards"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError("no shard committed in time")


@pytest.mark.timeout(400)
def test_sigkill_mid_job_then_recover(tmp_path, hf_backend, teacher_dir):
    root = tmp_path / "root"
    data = write_dataset(root / "data" / "d.jsonl", 16)
    cmd = [sys.executable, "-m", "todi.services.jobs", "--storage-root", str(root),
           "--dataset", "data/d.jsonl", "--out", "sets/k", "--top-k", str(TOP_K),
           "--model", str(teacher_dir), "--batch-tokens", "40", "--no-chat-template",
           "--positions-per-shard", "20"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = root / "sets" / "k"
    try:
        wait_for_shards(out / "manifest.json", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    partial = open_shard_set(out)
    assert not partial.complete and 0 < partial.num_rows < 16
    assert verify_shard_set(out).ok
    (record,) = (root / ".todi-jobs").glob("*.json")
    assert json.loads(record.read_text())["progress"]["state"] == "running"

    manager = JobManager(root, hf_backend)
    job_id = record.stem
    assert manager.get(job_id).state == "queued"  # interrupted: waits for recover()
    assert manager.recover() == [job_id]
    p = manager.wait(job_id, timeout=300)
    assert p.state == "succeeded", p.error
    assert p.resumed_sequences >= partial.num_rows
    assert p.sequences_done == p.sequences_total == 16
    check_exactly_once(out, expected_ids(data, hf_backend))
    assert json.loads(record.read_text())["progress"]["state"] == "succeeded"
    manager.shutdown()


@pytest.mark.timeout(300)
def test_manager_jobs_paths_limits(tmp_path, hf_backend):
    root = tmp_path / "root"
    write_dataset(root / "data" / "d.jsonl", 4)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)

    gate = threading.Event()

    def late_backend():  # the real backend, handed over when the test opens the gate
        gate.wait(120)
        return hf_backend

    manager = JobManager(root, late_backend, max_jobs=1)
    spec = JobSpec(dataset="data/d.jsonl", out="sets/a", top_k=TOP_K, chat_template=False)
    for bad, message in [
        ("../x", "must not contain '..'"),
        ("sets/../../x", "must not contain '..'"),
        (str(tmp_path / "elsewhere"), "outside the storage root"),
        ("escape/set", "outside the storage root"),
        (".todi-jobs/x", "job records folder"),
        (".", "storage root itself"),
        ("s3://bucket/x", "not a URI"),
    ]:
        with pytest.raises(JobPathError, match=message):
            manager.submit(spec.model_copy(update={"out": bad}))
    assert issubclass(JobPathError, ValueError)
    with pytest.raises(ValueError, match="dataset not found"):
        manager.submit(spec.model_copy(update={"dataset": "data/none.jsonl"}))

    job_a = manager.submit(spec)
    assert manager.submit(spec) == job_a  # identical job: the same id
    with pytest.raises(JobLimitError, match="max_jobs=1"):
        manager.submit(spec.model_copy(update={"out": "sets/b"}))
    with pytest.raises(JobConflictError, match="top_k"):
        manager.submit(spec.model_copy(update={"top_k": 3}))
    deadline = time.monotonic() + 30
    while manager.get(job_a).state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.get(job_a).state == "running"  # waiting for its backend
    manager.cancel(job_a)
    gate.set()
    p = manager.wait(job_a, timeout=120)
    assert p.state == "cancelled"
    assert not open_shard_set(root / "sets" / "a").complete

    # Re-submitting the identical job continues it to the end.
    assert manager.submit(spec) == job_a
    p = manager.wait(job_a, timeout=120)
    assert p.state == "succeeded", p.error
    assert p.sequences_done == 4 and p.out == str(root / "sets" / "a")
    assert [j.job_id for j in manager.list()] == [job_a]
    with pytest.raises(JobNotFoundError):
        manager.get("nope")

    # A bad dataset fails the job with the row named, the service goes on.
    (root / "data" / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    job_b = manager.submit(JobSpec(dataset="data/bad.jsonl", out="sets/b", top_k=TOP_K))
    p = manager.wait(job_b, timeout=60)
    assert p.state == "failed" and "bad.jsonl: line 2 (row 1)" in p.error
    manager.shutdown()

    # A restarted manager lists the finished jobs from their records and re-runs nothing.
    again = JobManager(root, hf_backend)
    assert {j.job_id: j.state for j in again.list()} == {job_a: "succeeded", job_b: "failed"}
    assert again.recover() == []


@pytest.mark.timeout(400)
def test_ray_two_actors_resume_partial_set(tmp_path, hf_backend, teacher_dir, ray_cluster):
    from todi.services.ray_precompute import run_ray_precompute

    data = write_dataset(tmp_path / "d.jsonl", 16)
    out = tmp_path / "set"
    spec = JobSpec(dataset=str(data), out=str(out), top_k=TOP_K, batch_tokens=80,
                   positions_per_shard=25, chat_template=False, ray=True, num_actors=2)  # fmt: skip
    # Start with a partial set from an in-process run, then let Ray finish it.
    cancel = threading.Event()
    run_precompute(spec, hf_backend, cancel=cancel, on_progress=lambda p: p.shards and cancel.set())
    done_first = open_shard_set(out).num_rows
    assert 0 < done_first < 16

    seen = []
    p = run_ray_precompute(spec, backend="hf", model=teacher_dir, info=hf_backend.info,
                           actor_num_cpus=0.5, on_progress=seen.append)  # fmt: skip
    assert p.state == "succeeded"
    assert p.resumed_sequences == done_first and p.sequences_done == 16
    check_exactly_once(out, expected_ids(data, hf_backend))
    assert not [f for f in os.listdir(out) if f.startswith(".staging-")]
    assert seen[-1].sequences_done == 16

    # The actors' shards hold the same values as the in-process engine.
    sample = next(s for s in open_shard_set(out) if s.prompt_len > 0)
    (direct,) = hf_backend.topk([sample.input_ids], TOP_K)
    fp = first_position(sample.prompt_len)
    np.testing.assert_array_equal(sample.topk_ids[:, 0], direct.ids[fp:, 0])
    np.testing.assert_allclose(sample.topk_logprobs, direct.logprobs[fp:], atol=0.03)


def test_ray_sampled_job_equals_the_in_process_one(tmp_path, hf_backend, teacher_dir, ray_cluster):
    """`--ray` writes sampled targets too, drawn from the same per-sequence generators as the
    in-process job (seeded by the seed and the sample id). The actors batch the sequences
    differently, so the float probabilities differ by a few ULP; inverse-CDF sampling over
    49k cumulative sums moves a draw when its uniform lands within that distance of a
    boundary (about 1 % of draws here; tests/tolerance.py). Different seeds would share only
    the teacher's typical ids."""
    from todi.services.ray_precompute import run_ray_precompute

    data = write_dataset(tmp_path / "d.jsonl", 8)
    common = dict(dataset=str(data), top_k=2, targets="sampled", draws=16, sample_seed=5,
                  batch_tokens=80, positions_per_shard=40, chat_template=False)  # fmt: skip
    local = JobSpec(out=str(tmp_path / "local"), **common)
    assert run_precompute(local, hf_backend).state == "succeeded"
    remote = JobSpec(out=str(tmp_path / "ray"), ray=True, num_actors=2, **common)
    p = run_ray_precompute(remote, backend="hf", model=teacher_dir, info=hf_backend.info,
                           actor_num_cpus=0.5)  # fmt: skip
    assert p.state == "succeeded"
    other = JobSpec(out=str(tmp_path / "seed6"), **{**common, "sample_seed": 6})
    assert run_precompute(other, hf_backend).state == "succeeded"
    sets = [{s.sample_id: s for s in open_shard_set(j.out)} for j in (local, remote, other)]
    assert sets[0].keys() == sets[1].keys() == sets[2].keys() and len(sets[0]) == 8

    def moved(a, b) -> float:
        """Share of draws that differ between two sets (as multisets per position)."""
        differ = total = 0
        for sid, s in a.items():
            t = b[sid]
            assert np.array_equal(s.topk_ids, t.topk_ids)
            for i in range(s.num_positions):
                ca = dict(
                    zip(
                        *(
                            x[s.draws.offsets[i] : s.draws.offsets[i + 1]].tolist()
                            for x in (s.draws.ids, s.draws.counts)
                        ),
                        strict=True,
                    )
                )
                cb = dict(zip(*(x[t.draws.offsets[i] : t.draws.offsets[i + 1]].tolist()
                                for x in (t.draws.ids, t.draws.counts)), strict=True))  # fmt: skip
                differ += 16 - sum(min(c, cb.get(v, 0)) for v, c in ca.items())
                total += 16
        return differ / total

    same_seed, new_seed = moved(sets[0], sets[1]), moved(sets[0], sets[2])
    assert same_seed < 0.05 and new_seed > 5 * max(same_seed, 0.01), (same_seed, new_seed)
    cov = open_shard_set(remote.out).manifest.job["coverage"]
    assert cov["positions"] == open_shard_set(remote.out).num_positions
    assert cov["mean"] == pytest.approx(1.0, abs=1e-5)
