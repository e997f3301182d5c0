"""Run every benchmark at its default size; save each JSON line under bench/results/.

    .venv/bin/python bench/run_all.py [--only loss,storage,teacher,generate,train]

Each benchmark prints its own table and ONE JSON line on stdout; this script stores that
line as bench/results/<name>.json (with the machine it ran on) for the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "storage": ["bench_storage.py"],
    "loss": ["bench_loss.py"],
    "teacher": ["bench_teacher.py"],
    "generate": ["bench_generate.py"],
    "train": ["bench_train.py", "--jemalloc-compare"],
}


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
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
        done = subprocess.run(
            [sys.executable, str(HERE / script), *extra], stdout=subprocess.PIPE, text=True
        )
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        print(done.stdout, flush=True)
        if done.returncode != 0 or not lines:
            failed.append(name)
            continue
        record = {"bench": name, "machine": machine(), "result": json.loads(lines[-1])}
        (results / f"{name}.json").write_text(json.dumps(record, indent=1))
    if failed:
        sys.exit(f"error: benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
