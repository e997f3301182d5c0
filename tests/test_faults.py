"""Storage faults: a full disk, an unwritable output, temp files left by dead writers.

The disk is a real small tmpfs (the tests mount one; they skip where mounting is not
allowed). A failed write names the file, leaves no temp file, and the set stays valid and
resumable; a later writer or `shards verify --clean` removes what a dead writer left.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from tests import test_train
from tests.test_storage import make_meta, make_samples
from todi.cli import app
from todi.storage import ShardSetWriter, open_shard_set, verify_shard_set
from todi.storage import fs as sfs


def _mount(path: Path, options: str) -> None:
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        # The suite runs as root (CI too): a machine where this fails cannot run the
        # disk-full checks, and that is a failure to see, not a skip.
        pytest.fail(
            f"cannot mount a tmpfs (the disk-full tests need root): {r.stderr.decode().strip()}",
            pytrace=False,
        )


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs; remount it larger with `grow()`."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount(disk, "size=256k")

    def grow(size: str = "64m") -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, grow
    subprocess.run(["umount", "-l", str(disk)], check=False)


def temp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


def test_disk_full_names_the_path_leaves_no_temp_file_and_resumes(small_disk) -> None:
    disk, grow = small_disk
    out = disk / "set"
    samples = make_samples(400, seed=3, lengths=(30, 60))
    with (
        pytest.raises(OSError) as info,
        ShardSetWriter(out, make_meta(), positions_per_shard=400) as w,
    ):
        for s in samples:  # until the disk fills
            w.write(s)
    assert info.value.errno == 28, info.value
    assert str(out) in str(info.value), info.value  # the path is named
    assert temp_files(out) == []
    report = verify_shard_set(out)
    assert report.ok, report.problems
    done = {s.sample_id for s in open_shard_set(out)}
    assert done and len(done) < len(samples)
    # Space freed: the next writer resumes with the samples not yet in whole shards.
    grow()
    with ShardSetWriter(out, make_meta(), positions_per_shard=400) as w:
        for s in samples:
            if s.sample_id not in done:
                w.write(s)
    got = [s.sample_id for s in open_shard_set(out)]
    assert sorted(got) == sorted(s.sample_id for s in samples)  # every sample exactly once
    assert verify_shard_set(out).ok and temp_files(out) == []


def test_unwritable_output_names_the_path(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount(ro, "size=1m,ro")
    try:
        with pytest.raises(OSError) as info:
            ShardSetWriter(ro / "set", make_meta())
        assert str(ro / "set") in str(info.value), info.value
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_stale_temp_files_are_reported_and_removed(tmp_path: Path) -> None:
    out = tmp_path / "set"
    with ShardSetWriter(out, make_meta()) as w:
        w.write_many(make_samples(5))
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone
    host = sfs._host()
    stale = [
        out / f".tmp-{dead.pid}@{host}-part-0123456789abcdef.parquet",
        out / f".tmp-{dead.pid}-manifest.json",  # the older name, no host
    ]
    alive = out / f".tmp-{os.getpid()}@{host}-part-live.parquet"  # this process: alive
    other_host = out / f".tmp-{dead.pid}@elsewhere-part-x.parquet"  # may be alive there
    for p in (*stale, alive, other_host):
        p.write_bytes(b"half a shard")
    report = verify_shard_set(out)
    assert report.ok
    flagged = [w for w in report.warnings if "temp file" in w]
    assert sorted(flagged) == sorted(
        f"{p}: temp file of a writer that is gone (remove with --clean)" for p in stale
    )
    r = CliRunner().invoke(app, ["shards", "verify", str(out)])
    assert r.exit_code == 0 and "temp file of a writer that is gone" in r.output, r.output
    r = CliRunner().invoke(app, ["shards", "verify", "--clean", str(out)])
    assert r.exit_code == 0 and r.output.count("removed: ") == 2, r.output
    assert not any(p.exists() for p in stale) and alive.exists() and other_host.exists()
    # The next writer also removes a dead writer's leftovers.
    stale[0].write_bytes(b"again")
    w = ShardSetWriter(out, make_meta())
    assert w.removed_temp_files == [str(stale[0])]
    w.close()
    assert sfs.stale_temp_files(pafs.LocalFileSystem(), str(out)) == []


# -- a corrupt shard inside Ray: the original message, naming the file, no retries -------------
# The training fixtures, shared with tests/test_train.py (session-scoped there).
hf_teacher = test_train.hf_teacher
train_shards = test_train.train_shards
tiny_student = test_train.tiny_student


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_corrupt_shard_in_a_ray_run_names_the_file(
    ray_cluster, train_shards, tiny_student, tmp_path: Path
) -> None:
    import shutil
    import time

    from todi.trainer.train import TrainError, train

    broken = tmp_path / "broken"
    shutil.copytree(train_shards, broken)
    victim = sorted(broken.glob("*.parquet"))[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    started = time.monotonic()
    with pytest.raises(TrainError) as info:
        cfg = test_train._config(broken, tiny_student, tmp_path / "o", verify=False, max_failures=2)
        train(cfg)
    message = str(info.value)
    print(f"failed after {time.monotonic() - started:.1f}s: {message}")
    assert victim.name in message and "sha256" in message, message
    assert "\n" not in message and "retry" not in message, message


# -- a full disk under a precompute job -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_on_a_full_disk_fails_naming_the_path_and_resumes(hf_teacher, tmp_path: Path) -> None:
    """A job whose output folder is a 96 KiB tmpfs: it fails with an error naming the
    shard path, leaves no temp file and a valid partial set; after the disk grows, the
    same job resumes and holds every sample exactly once."""
    import json

    from todi.services.jobs import JobManager

    root = tmp_path / "root"
    disk = root / "full"
    disk.mkdir(parents=True)
    _mount(disk, "size=96k")
    try:
        data = tmp_path / "rows.jsonl"
        rows = [{"id": f"r{i}", "text": f"row {i}: " + "lorem ipsum " * 12} for i in range(40)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {"dataset": str(data), "out": "full/set", "top_k": 16, "positions_per_shard": 40}
        manager = JobManager(root, hf_teacher)
        job_id = manager.submit(spec)
        p = manager.wait(job_id, timeout=300)
        assert p.state == "failed", p
        assert "No space left on device" in p.error and str(disk / "set") in p.error, p.error
        out = disk / "set"
        assert temp_files(out) == []
        assert verify_shard_set(out).ok
        done = {s.sample_id for s in open_shard_set(out)}
        assert len(done) < len(rows)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert manager.submit(spec) == job_id  # the same job, resumed
        p = manager.wait(job_id, timeout=300)
        assert p.state == "succeeded", p.error
        ids = [s.sample_id for s in open_shard_set(out)]
        assert len(ids) == len(set(ids)) == len(rows)
        assert verify_shard_set(out).ok and temp_files(out) == []
        manager.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# -- corruption: verify, the reader and the trainer's check all refuse, naming the file ------
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest-rows", "manifest-sha"])
def test_corruption_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    import json

    from todi.storage import ShardFormatError
    from todi.trainer.data import DataError, open_for_training

    out = tmp_path / "set"
    with ShardSetWriter(out, make_meta(), positions_per_shard=60) as w:
        w.write_many(make_samples(30, seed=5))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 2
    victim = out / manifest["shards"][1]["file"]
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x10
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "delete":
        victim.unlink()
    else:
        key = "rows" if damage == "manifest-rows" else "sha256"
        value = manifest["shards"][1][key]
        manifest["shards"][1][key] = value + 1 if key == "rows" else "0" * 64
        (out / "manifest.json").write_text(json.dumps(manifest))
    report = verify_shard_set(out)
    assert not report.ok and any(victim.name in p for p in report.problems), report.problems
    with pytest.raises(ShardFormatError, match=victim.name):
        for _ in open_shard_set(out):
            pass
    with pytest.raises(DataError, match=victim.name):
        open_for_training(str(out))
