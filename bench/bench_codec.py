"""Hand-written rANS (`rans-q32-v1`: storage/rans.py + storage/_jit.py, numba) against the
same model coded by a maintained library (`ans-q32-c1`: constriction's compiled ANS), on REAL
teacher output (SmolLM2-135M-Instruct top-64 over chatterbot text, bench_storage's cache),
and the context-match id model built on our rANS (`rans-q32-v2`: storage/codec_match.py).

Reports per codec: bytes per (id, log-prob) entry of a whole shard, ids exact, mean / max
log-prob error, encode and decode positions per CPU-second (whole shard; and 8-row batches,
the trainer's pattern), lines of our code that implement the entropy coding, and the goals:

    bytes/entry <= 1.7 at k = 64, ids exact, mean error <= 0.01 nat,
    decode faster than the trainer consumes (bench_train's offline tokens/s)

    .venv/bin/python bench/bench_codec.py [--sequences 200] [--seq-len 256] [--top-k 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_storage import measure, teacher_topk  # noqa: E402
from machine import machine  # noqa: E402

CODECS = ("rans-q32-v1", "ans-q32-c1", "rans-q32-v2")
GOAL_BYTES = 1.7
GOAL_ERR = 0.01
# The trainer's consumption when no bench/results/train.json exists: bench_train's offline
# run, 25.2 tokens/s (10-layer student, 2 CPU workers; README, Benchmarks).
TRAINER_TOKENS_PER_S = 25.2


def code_lines(path: Path, start: str | None = None, end: str | None = None) -> dict:
    """Lines of a file (or of the part from the line starting with `start` up to `end`):
    all, and code (not blank, not a comment, not inside a docstring)."""
    lines = path.read_text().splitlines()
    if start is not None:
        i = next(n for n, ln in enumerate(lines) if ln.startswith(start))
        j = next((n for n, ln in enumerate(lines) if n > i and end and ln.startswith(end)), None)
        lines = lines[i:j]
    code, in_doc = 0, False
    for ln in lines:
        s = ln.strip()
        quotes = s.count('"""')
        if in_doc:
            in_doc = quotes % 2 == 0
            continue
        if s.startswith('"""'):
            in_doc = quotes == 1
            continue
        if s and not s.startswith("#"):
            code += 1
    return {"lines": len(lines), "code_lines": code}


def our_code() -> dict:
    st = ROOT / "storage"
    return {
        "rans-q32-v1": {
            "storage/rans.py": code_lines(st / "rans.py"),
            "storage/_jit.py": code_lines(st / "_jit.py"),
            "storage/codec.py RansQ32": code_lines(st / "codec.py", "class RansQ32", "_CODECS"),
        },
        "ans-q32-c1": {
            "storage/codec_constriction.py": code_lines(st / "codec_constriction.py"),
        },
        # v2 runs on v1's coder and kernels, plus its id model
        "rans-q32-v2": {
            "storage/rans.py": code_lines(st / "rans.py"),
            "storage/_jit.py": code_lines(st / "_jit.py"),
            "storage/codec.py RansQ32": code_lines(st / "codec.py", "class RansQ32", "_CODECS"),
            "storage/codec_match.py": code_lines(st / "codec_match.py"),
        },
        "shared": {
            "storage/codec.py symbols + ShardTable": code_lines(
                st / "codec.py", "_LIT = ", "class RansQ32"
            ),
        },
    }


def trainer_rate() -> tuple[float, str]:
    path = HERE / "results" / "train.json"
    if path.is_file():
        res = json.loads(path.read_text()).get("result", {})
        for key in ("offline_tokens_per_s", "tokens_per_s_offline"):
            if key in res:
                return float(res[key]), f"bench/results/train.json {key}"
    return TRAINER_TOKENS_PER_S, "README (bench_train offline tokens/s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import constriction

    from todi.storage import Sample

    tokens, ids, lps = teacher_topk(args.sequences, args.seq_len, args.top_k)
    samples = [
        Sample(f"seq{i}", tokens[i], 0, ids[i], lps[i].astype(np.float32))
        for i in range(len(tokens))
    ]
    results = {c: measure(c, samples, 49152, args.top_k) for c in CODECS}
    lines = our_code()
    for codec, parts in lines.items():
        if codec in results:
            results[codec]["our_code_lines"] = sum(p["code_lines"] for p in parts.values())
            results[codec]["our_lines"] = sum(p["lines"] for p in parts.values())
    consume, consume_src = trainer_rate()
    old, new = results["rans-q32-v1"], results["ans-q32-c1"]
    v2 = results["rans-q32-v2"]
    v2_ratios = {
        "bytes": round(v2["bytes"] / old["bytes"], 4),
        "encode_cpu_speed": round(v2["encode_pos_per_s"] / old["encode_pos_per_s"], 3),
        "decode_cpu_speed": round(v2["decode_pos_per_s"] / old["decode_pos_per_s"], 3),
        "batch8_decode_cpu_speed": round(
            v2["batch8_decode_pos_per_s"] / old["batch8_decode_pos_per_s"], 3
        ),
        "numpy_decode_cpu_speed": round(
            v2["decode_pos_per_s_numpy"] / old["decode_pos_per_s_numpy"], 3
        ),
    }
    ratios = {
        "bytes": round(new["bytes"] / old["bytes"], 4),
        "encode_cpu_speed": round(new["encode_pos_per_s"] / old["encode_pos_per_s"], 3),
        "decode_cpu_speed": round(new["decode_pos_per_s"] / old["decode_pos_per_s"], 3),
        "batch8_decode_cpu_speed": round(
            new["batch8_decode_pos_per_s"] / old["batch8_decode_pos_per_s"], 3
        ),
        "decode_cpu_speed_vs_numpy_fallback": round(
            new["decode_pos_per_s"] / old["decode_pos_per_s_numpy"], 3
        ),
        "our_code_lines": round(new["our_code_lines"] / old["our_code_lines"], 3),
    }
    goals = {
        c: {
            "bytes_per_entry": r["bytes_per_entry"] <= GOAL_BYTES,
            "ids_exact": r["ids_exact"],
            "mean_err": r["mean_err"] <= GOAL_ERR,
            "decode_faster_than_trainer": r["batch8_decode_pos_per_s"] > consume,
        }
        for c, r in results.items()
    }
    line = {
        "bench": "codec",
        "machine": machine(),
        "teacher": "smollm2-135m-instruct",
        "sequences": len(samples),
        "positions": sum(s.num_positions for s in samples),
        "k": args.top_k,
        "constriction": getattr(constriction, "__version__", None),
        "goal_bytes_per_entry": GOAL_BYTES,
        "trainer_tokens_per_s": consume,
        "trainer_tokens_per_s_source": consume_src,
        "codecs": results,
        "code": lines,
        "ratios_new_over_old": ratios,
        "ratios_v2_over_v1": v2_ratios,
        "goals_met": goals,
        "winner": min(CODECS, key=lambda c: results[c]["bytes_per_entry"]),
    }
    print(json.dumps(line))
    head = (
        f"{'codec':<14}{'B/entry':>9}{'ids':>6}{'mean err':>10}{'enc pos/s':>11}"
        f"{'dec pos/s':>11}{'batch8':>10}{'code lines':>12}{'goals':>7}"
    )
    print(head)
    print("-" * len(head))
    for c, r in results.items():
        print(
            f"{c:<14}{r['bytes_per_entry']:>9.3f}{'exact' if r['ids_exact'] else 'NO':>6}"
            f"{r['mean_err']:>10.4f}{r['encode_pos_per_s']:>11,}{r['decode_pos_per_s']:>11,}"
            f"{r['batch8_decode_pos_per_s']:>10,}{r['our_code_lines']:>12}"
            f"{'all' if all(goals[c].values()) else 'no':>7}"
        )
    print("c1 / v1: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print("v2 / v1: " + ", ".join(f"{k} {v}" for k, v in v2_ratios.items()))


if __name__ == "__main__":
    main()
