"""The whole pipeline, for real, at toy size: `todi demo --fast` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from todi.demo import DemoConfig


@pytest.mark.timeout(1500)
def test_demo_fast_runs_the_whole_pipeline(tmp_path: Path, teacher_dir: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "todi.cli", "demo", "--fast", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1450,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in range(1, 7):
        assert f"[{step}/6]" in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval"]["before"]["metrics"], summary["eval"]["after"]["metrics"]
    # Trained with ToDi, the student moves toward the teacher on held-out data.
    assert after["todi"] < 0.5 * before["todi"]
    assert after["fkl"] < before["fkl"]
    assert after["top1_agreement"] >= before["top1_agreement"]
    assert after["ce"] < before["ce"]

    # Every artifact the summary names exists and is usable.
    from todi.storage import open_shard_set, verify_shard_set

    for name in ("train", "heldout"):
        report = verify_shard_set(out / "shards" / name)
        assert report.ok, report.problems
        shard_set = open_shard_set(out / "shards" / name)
        assert shard_set.complete
        assert shard_set.signature.temperature == DemoConfig().temperature
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt"] and r["response"] for r in rows)
    log = [json.loads(line) for line in Path(summary["train_log"]).read_text().splitlines()]
    assert len(log) >= 4
    assert Path(summary["eval_plot"]).stat().st_size > 1000

    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(summary["student"])
    assert student.config.num_hidden_layers == 2
    with torch.inference_mode():
        generated = student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
