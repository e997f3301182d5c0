"""How close each stored-target form's gradient is to the live teacher's, on real data.

For held-out positions of the study's data (bench/quality.py's working folder), the teacher's
full-vocabulary log-probs are the reference; for a student (the study's initial student and a
trained one) the gradient of ToDi / FKL / RKL w.r.t. the student's logits is computed against:

- bucket: top-k + one tail bucket (`--topk-target tail`, the default),
- spread: top-k + the rest spread evenly over the unlisted ids (`--topk-target spread`),
- shape:  top-k + the rest spread by a per-token tail shape, the teacher's mean log-prob per
          token over training positions (NOT a product mode: what recording such a shape at
          capture would buy).

Reported per form: the mean angle to the live gradient and the relative squared error
sum |g_hat - g|^2 / sum |g|^2. Accuracy only: nothing here is timed.

Usage: .venv/bin/python bench/bench_target_gradients.py --study /root/.cache/todi/quality-targets
Prints a table on stderr and ONE JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _samples(path: Path, n: int) -> list:
    from todi.storage import open_shard_set

    out = []
    for i, x in enumerate(open_shard_set(path).iter_samples()):
        if i >= n:
            break
        out.append(x)
    return out


def _filled(lp_top: torch.Tensor, ids: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probs [P, V]: the listed ids' own, the rest spread by `shape` [V]."""
    from todi.trainer.divergences import teacher_tail_logprob

    rest = teacher_tail_logprob(lp_top)
    base = shape.expand(len(lp_top), -1).clone().scatter_(1, ids, -math.inf)
    out = base - torch.logsumexp(base, -1, keepdim=True) + rest[:, None]
    return out.scatter_(1, ids, lp_top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default=str(Path.home() / ".cache/todi/quality-targets"))
    ap.add_argument("--trained", default="runs/todi-s0/train/model")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--shape-sequences", type=int, default=200)
    ap.add_argument("--sequences", type=int, default=48)
    args = ap.parse_args()

    from machine import machine
    from transformers import AutoModelForCausalLM

    from todi.storage.batches import IGNORE_INDEX, collate
    from todi.trainer.chunked import sparse_divergence
    from todi.trainer.divergences import outcome_divergence

    study = Path(args.study)
    teacher_dir = study.parent / "models" / "smollm2-135m-instruct"
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    teacher = load(teacher_dir)
    v = teacher.config.vocab_size

    def logits(model, samples):
        b = collate(samples)
        keep = b.labels != IGNORE_INDEX
        with torch.no_grad():
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        return out[keep].double()

    train = _samples(study / "shards" / "train-k64-T1", args.shape_sequences)
    total, count = torch.zeros(v, dtype=torch.float64), 0
    for i in range(0, len(train), 8):
        lp = torch.log_softmax(logits(teacher, train[i : i + 8]), -1)
        total += lp.sum(0)
        count += lp.shape[0]
    mean_lp = total / count  # the per-token tail shape at T = 1
    held = _samples(study / "shards" / "heldout-k64-T1", args.sequences)
    students = {
        "initial": study / "runs/todi-s0/train/student_init",
        "trained": study / args.trained,
    }
    rows = []
    for sname, path in students.items():
        student = load(path)
        for temperature in (1.0, 2.0):
            acc: dict[tuple[str, str], list[float]] = {}
            for i in range(0, len(held), 8):
                batch = held[i : i + 8]
                lp = torch.log_softmax(logits(teacher, batch) / temperature, -1)
                z0 = logits(student, batch)
                lp_top, ids = lp.topk(args.top_k, -1)
                forms = {
                    "spread": _filled(lp_top, ids, torch.zeros(v, dtype=torch.float64)),
                    "shape": _filled(lp_top, ids, mean_lp / temperature),
                }
                for kind in ("todi", "fkl", "rkl"):
                    z = z0.clone().requires_grad_(True)
                    exact = outcome_divergence(kind, lp, torch.log_softmax(z / temperature, -1))
                    (g,) = torch.autograd.grad(exact.sum(), z)
                    grads = {}
                    z = z0.clone().requires_grad_(True)
                    d = sparse_divergence(kind, z, ids, lp_top, temperature=temperature)
                    (grads["bucket"],) = torch.autograd.grad(d.sum(), z)
                    for name, full in forms.items():
                        z = z0.clone().requires_grad_(True)
                        d = outcome_divergence(kind, full, torch.log_softmax(z / temperature, -1))
                        (grads[name],) = torch.autograd.grad(d.sum(), z)
                    for name, gh in grads.items():
                        cos = torch.nn.functional.cosine_similarity(gh, g, dim=1).clamp(-1, 1)
                        a = acc.setdefault((kind, name), [0.0, 0.0, 0.0, 0.0])
                        a[0] += float(torch.rad2deg(torch.acos(cos)).sum())
                        a[1] += float(((gh - g) ** 2).sum())
                        a[2] += float((g**2).sum())
                        a[3] += len(g)
            for (kind, name), a in acc.items():
                rows.append({
                    "student": sname, "temperature": temperature, "kind": kind, "form": name,
                    "angle_deg": a[0] / a[3], "relative_sq_error": a[1] / a[2],
                    "positions": int(a[3]),
                })  # fmt: skip
    result = {
        "bench": "target_gradients",
        "top_k": args.top_k,
        "shape_positions": count,
        "machine": machine(),
        "rows": rows,
    }
    print(f"{'student':8} {'T':>3} {'kind':5} {'form':7} {'angle':>6} {'rel.sq.err':>10}",
          file=sys.stderr)  # fmt: skip
    for r in rows:
        print(
            f"{r['student']:8} {r['temperature']:3g} {r['kind']:5} {r['form']:7} "
            f"{r['angle_deg']:6.1f} {r['relative_sq_error']:10.3f}",
            file=sys.stderr,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
