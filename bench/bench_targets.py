"""What each capture mode costs: teacher tokens/s of the whole precompute job and shard bytes
per position, for top-k + tail, draws (RS-KD), the hybrid, and top-k with re-tempering.

One `hf` engine (the full-vocabulary engine that draws and re-tempering need) scores the same
chatterbot pairs once per mode, in rounds (every mode once per round, in a rotated order), so a
busy machine slows every mode alike; the table gives each mode's median over the rounds and
its ratio to top-64 + tail from the same rounds.

Usage: .venv/bin/python bench/bench_targets.py [--sequences 120] [--rounds 3]
Prints a table on stderr and ONE JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_teacher import chatterbot_pairs  # noqa: E402

# name -> (temperature, JobSpec fields)
MODES = {
    "top-64 + tail, T=1": (1.0, {"top_k": 64}),
    "top-64 + tail, T=2": (2.0, {"top_k": 64}),
    "top-64 + tail + retemper 2, T=1": (1.0, {"top_k": 64, "retemper": [2.0]}),
    "draws 50, T=1": (1.0, {"top_k": 0, "targets": "sampled", "draws": 50}),
    "draws 50, T=2": (2.0, {"top_k": 0, "targets": "sampled", "draws": 50}),
    "draws 16, T=2": (2.0, {"top_k": 0, "targets": "sampled", "draws": 16}),
    "top-8 + draws 42, T=2": (2.0, {"top_k": 8, "targets": "sampled", "draws": 42}),
    "top-8 + draws 24, T=1": (1.0, {"top_k": 8, "targets": "sampled", "draws": 24}),
}
BASE = "top-64 + tail, T=1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=256)
    args = ap.parse_args()

    from machine import machine

    from todi.services.backends import create_backend
    from todi.services.config import JobSpec
    from todi.services.models import prepare_model
    from todi.services.precompute import run_precompute
    from todi.storage import open_shard_set

    engine = create_backend("hf", prepare_model("smollm2-135m-instruct"), max_top_k=64)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    ratios: dict[str, list[float]] = {m: [] for m in MODES}
    sizes: dict[str, dict] = {}
    names = list(MODES)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        rows = chatterbot_pairs(args.sequences)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            took = {}
            for name in order:
                temperature, fields = MODES[name]
                out = Path(tmp) / f"r{r}-{len(took)}"
                spec = JobSpec(dataset=str(data), out=str(out), temperature=temperature,
                               max_seq_len=args.max_seq_len, **fields)  # fmt: skip
                t0 = time.perf_counter()
                run_precompute(spec, engine)
                took[name] = time.perf_counter() - t0
                s = open_shard_set(out)
                tokens = sum(len(x.input_ids) for x in s)
                sizes[name] = {
                    "tokens": tokens,
                    "positions": s.num_positions,
                    "bytes_per_position": s.manifest.bytes / s.num_positions,
                }
                if fields.get("targets") == "sampled":
                    unique = sum(int(x.draws.ids.size) for x in s)
                    sizes[name]["unique_draws_per_position"] = unique / s.num_positions
            for name in names:
                times[name].append(sizes[name]["tokens"] / took[name])
                ratios[name].append(took[BASE] / took[name])
    engine.close()
    result = {
        "bench": "targets",
        "sequences": args.sequences,
        "rounds": args.rounds,
        "engine": "hf",
        "machine": machine(),
        "modes": {
            name: {
                **sizes[name],
                "tokens_per_s": statistics.median(times[name]),
                "speed_vs_topk64_t1": statistics.median(ratios[name]),
            }
            for name in names
        },
    }
    print(f"{'mode':34} {'B/pos':>7} {'uniq':>5} {'tok/s':>7} {'vs top-64 T=1':>14}",
          file=sys.stderr)  # fmt: skip
    for name, m in result["modes"].items():
        uniq = m.get("unique_draws_per_position")
        print(
            f"{name:34} {m['bytes_per_position']:7.1f} "
            f"{'' if uniq is None else f'{uniq:5.1f}':>5} {m['tokens_per_s']:7.1f} "
            f"{m['speed_vs_topk64_t1']:14.2f}",
            file=sys.stderr,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
