"""Run every benchmark at its default size; save each JSON line under bench/results/.

    .venv/bin/python bench/run_all.py \
        [--only storage,codec,loss,teacher,targets,generate,train,scale]

Each benchmark prints its own table and ONE JSON line on stdout; this script stores that
line as bench/results/<name>.json (with the machine it ran on) for the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine  # noqa: E402  (bench/machine.py)

BENCHES = {
    "storage": ["bench_storage.py"],
    "codec": ["bench_codec.py"],
    "loss": ["bench_loss.py"],
    "teacher": ["bench_teacher.py"],
    "targets": ["bench_targets.py"],
    "generate": ["bench_generate.py"],
    "train": ["bench_train.py", "--jemalloc-compare"],
    "scale": ["bench_scale.py"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHES))
    args = parser.parse_args()
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    failed = []
    for name in args.only.split(","):
        script, *extra = BENCHES[name]
        print(f"== {name}: {script} {' '.join(extra)}", flush=True)
        load_before = os.getloadavg()[0]
        done = subprocess.run(
            [sys.executable, str(HERE / script), *extra], stdout=subprocess.PIPE, text=True
        )
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        print(done.stdout, flush=True)
        if done.returncode != 0 or not lines:
            failed.append(name)
            continue
        record = {"bench": name, "machine": machine(), "result": json.loads(lines[-1])}
        record["machine"]["load_average_1m_at_start"] = round(load_before, 2)
        (results / f"{name}.json").write_text(json.dumps(record, indent=1))
    if failed:
        sys.exit(f"error: benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
