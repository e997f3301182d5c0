"""`todi models prepare|temper`, `todi serve` and `todi precompute` as a user runs them.

Argument errors and the model commands run the real Typer app in-process (CliRunner: no
console-script start-up per case); `precompute --local` runs as a real `todi` process with
its progress bar. Every user error is one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from todi.storage import open_shard_set, verify_shard_set

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
TODI = str(ROOT / ".venv" / "bin" / "todi")


@pytest.fixture(scope="module")
def cli():
    from todi.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return run


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_models_prepare_prints_the_folder(cli, teacher_dir: Path, tmp_path: Path) -> None:
    r = cli("models", "prepare", "smollm2-135m-instruct")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(teacher_dir)  # already prepared: idempotent, same folder
    assert_user_error(cli("models", "prepare", "no-such-model"), "unknown model")


def test_models_temper(cli, teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t2"
    r = cli("models", "temper", teacher_dir, "--temperature", "2", "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout.strip() == str(out)
    marker = json.loads((out / "todi_tempered.json").read_text())
    assert marker["temperature"] == 2.0
    again = cli("models", "temper", teacher_dir, "--temperature", "2", "--out", out)
    assert again.exit_code == 0 and again.stdout.strip() == str(out)
    assert_user_error(cli("models", "temper", teacher_dir, "--temperature", "0"), "temperature")


def test_serve_refuses_bad_configuration(cli, teacher_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert_user_error(
        cli("serve", "--backend", "nope", "--model", teacher_dir, "--storage-root", root),
        "backend",
    )
    assert_user_error(
        cli("serve", "--model", teacher_dir, "--storage-root", root, "--option", "bogus=1"),
        "bogus",
    )
    assert_user_error(cli("serve", "--model", teacher_dir, "--option", "novalue"), "KEY=VALUE")
    assert_user_error(
        cli("serve", "--model", tmp_path, "--storage-root", root), "config.json"
    )  # not an HF folder
    assert_user_error(
        cli("serve", "--model", teacher_dir, "--storage-root", root, "--port", "70000"), "port"
    )


def test_precompute_argument_errors(cli, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n')
    base = ["precompute", "--dataset", data, "--out", "o", "--top-k", "2"]
    assert_user_error(cli(*base), "--server", "--local")
    assert_user_error(cli(*base, "--local", "--server", "http://x"), "exactly one")
    url = f"http://127.0.0.1:{_closed_port()}"
    assert_user_error(cli(*base, "--server", url), "cannot reach")
    assert_user_error(cli(*base, "--local", "--backend", "nope"), "backend")
    bad_top_k = ["precompute", "--dataset", data, "--out", "o", "--top-k", "0", "--local"]
    assert_user_error(cli(*bad_top_k), "top_k")


@pytest.mark.slow
def test_precompute_local_runs_the_job_in_process(teacher_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"id": "a", "text": "The capital of France is Paris."},
        {"id": "b", "text": "Hi there!"},
        {"id": "c", "text": "One two three four five six seven eight nine ten eleven."},
        {"id": "empty", "text": ""},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "set"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [
        TODI, "precompute", "--local", "--backend", "hf", "--model", str(teacher_dir),
        "--dataset", str(data), "--out", str(out), "--top-k", "3", "--max-seq-len", "8",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["state"] == "succeeded" and final["sequences_done"] == 3
    assert final["empty_rows"] == 1 and final["truncated"] >= 1
    assert "3/3" in proc.stderr  # the progress bar reached the end
    s = open_shard_set(out)
    assert s.complete and sorted(x.sample_id for x in s) == ["a", "b", "c"]
    assert verify_shard_set(out).ok
    assert max(len(x.input_ids) for x in s) <= 8
