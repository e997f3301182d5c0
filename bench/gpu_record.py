"""Store one step of bench/gpu_check.sh as bench/results/NAME.json: the command's last JSON
line, the machine (GPU, torch, CPU) and, for a training step, the loss curve, the step times,
the peak GPU memory the worker logged, and whether transformers loads the exported model.

    python bench/gpu_record.py NAME OUTPUT_FILE [--log train_log.jsonl] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine  # noqa: E402  (bench/machine.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("output")
    parser.add_argument("--log")
    parser.add_argument("--model")
    args = parser.parse_args()
    import torch

    lines = [x for x in Path(args.output).read_text().splitlines() if x.startswith("{")]
    record = {
        "bench": args.name,
        "machine": {
            **machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "result": json.loads(lines[-1]) if lines else None,
    }
    if args.log:
        log = [json.loads(x) for x in Path(args.log).read_text().splitlines() if x.strip()]
        record["losses"] = [r["loss"] for r in log]
        record["step_s"] = [r["step_s"] for r in log]
        record["tokens_per_s"] = [r["tokens_per_s"] for r in log]
        record["gpu_peak_gib"] = max((r.get("gpu_peak_gib") or 0.0) for r in log)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model)
        record["export_loads"] = sum(p.numel() for p in model.parameters())
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k not in ("machine", "result")}))


if __name__ == "__main__":
    main()
