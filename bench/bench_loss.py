"""Loss memory and time: chunked sparse ToDi on the output head vs the naive [N, V] version.

Both variants compute the same objective, 0.5 * CE + 0.5 * sparse divergence (k teacher ids +
tail, default ToDi at the paper's T = 2) as a mean over N positions, from the last hidden state
[N, H] and the head [V, H], forward and backward (gradients of hidden and head):

- naive:   logits = hidden @ W^T as one [N, V] tensor, plain autograd
           (`todi.trainer.chunked.reference_head_loss`);
- chunked: `todi.trainer.chunked.chunked_head_loss(..., kd_weight=0.5)`, chunk_size rows at a
           time, the gradients made chunk-wise during forward (the trainer's path);
- chunked_recompute: the same without kd_weight: backward recomputes each chunk's logits
           (one more head matmul).

How memory is measured (honestly, for CPU torch, which allocates straight from malloc/mmap and
returns large blocks to the OS when freed, so the resident set follows the live tensors):
each variant runs in a FRESH subprocess; after the inputs are built, the kernel's resident-set
high-water mark (VmHWM in /proc/self/status) is reset by writing "5" to /proc/self/clear_refs;
after forward + backward, "peak memory of the loss" = VmHWM - VmRSS at the reset (glibc is
told to map every block of 1 MiB or more on its own, see `_child_env`). It therefore
counts every temporary of the loss and its outputs (the gradients of hidden and head, the
same in both variants), but not the inputs. tracemalloc would not see torch's allocations,
and a sampling thread could miss short peaks; the kernel's high-water mark misses nothing.
Time: wall-clock seconds for forward + backward, best of --repeats runs in the same process
(the high-water mark covers all of them), and the process CPU seconds (user + system, from
getrusage) of that same run. On a shared machine the wall clock includes waiting for a core;
CPU seconds do not, so both are reported (threads: torch's intra-op thread count).

Usage: .venv/bin/python bench/bench_loss.py [--positions 8192] [--vocab 49152] [--hidden 576]
       [--k 64] [--kind todi] [--temperature 2.0] [--chunk-size 1024] [--repeats 1]
Prints a small table on stderr and ONE JSON line on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("naive", "chunked", "chunked_recompute")


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _child_env() -> dict[str, str]:
    """Environment of a measured child: glibc maps every block of 1 MiB or more on its own.

    By default glibc serves blocks up to 32 MiB from its heap, where they can reuse memory
    that the set-up freed (already resident, so invisible to the high-water mark) and stay
    resident after being freed. With a fixed 1 MiB threshold each tensor of that size or more
    is resident exactly while alive, in both variants, at any --positions."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from todi.trainer.chunked import chunked_head_loss, reference_head_loss
    from todi.trainer.objective import distillation_loss

    torch.manual_seed(args.seed)
    n, v, h, k, t = args.positions, args.vocab, args.hidden, args.k, args.temperature
    hidden = (torch.randn(n, h) / h**0.5 * 4).requires_grad_(True)
    weight = torch.randn(v, h).requires_grad_(True)
    labels = torch.randint(0, v, (n,))
    # A synthetic teacher's top-k at temperature t, built chunk-wise (never [N, V] at once):
    # the student's own logits plus noise, so the two distributions are close but not equal.
    ids, lps = [], []
    with torch.no_grad():
        for s in range(0, n, 1024):
            z = hidden[s : s + 1024] @ weight.T + torch.randn(min(1024, n - s), v)
            lp, idx = torch.log_softmax(z / t, dim=-1).topk(k, dim=-1)
            ids.append(idx)
            lps.append(lp)
            del z
    topk_ids, topk_lps = torch.cat(ids), torch.cat(lps)
    del ids, lps
    gc.collect()

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def run() -> tuple[float, float, float, float]:
        hidden.grad = weight.grad = None
        start, cpu_start = time.perf_counter(), cpu_seconds()
        if args.variant != "naive":
            parts = chunked_head_loss(
                hidden,
                weight,
                None,
                labels,
                topk_ids,
                topk_lps,
                kind=args.kind,
                temperature=t,
                chunk_size=args.chunk_size,
                kd_weight=0.5 if args.variant == "chunked" else None,
            )
        else:
            parts = reference_head_loss(
                hidden, weight, None, labels, topk_ids, topk_lps, kind=args.kind, temperature=t
            )
        loss = distillation_loss(parts.ce_sum, parts.div_sum, parts.n_tokens, kd_weight=0.5)
        loss.backward()
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        value = float(loss)
        del parts, loss
        return elapsed, cpu, value, float(weight.grad.norm())

    rss_before = _status_kib("VmRSS")
    _reset_high_water()
    runs = [run() for _ in range(args.repeats)]
    peak = _status_kib("VmHWM")
    best = min(runs)
    _, _, value, grad_norm = best
    return {
        "variant": args.variant,
        "seconds": best[0],
        "cpu_seconds": best[1],
        "all_seconds": [r[0] for r in runs],
        "peak_mib": (peak - rss_before) / 1024,
        "loss": value,
        "head_grad_norm": grad_norm,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--kind", default="todi")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_child(args)))
        return

    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant]
        for name in ("positions", "vocab", "hidden", "k", "kind", "temperature"):
            cmd += [f"--{name}", str(getattr(args, name))]
        cmd += ["--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
        cmd += ["--seed", str(args.seed)]
        out = subprocess.run(
            cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=_child_env()
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])

    naive = results["naive"]
    logits_mib = args.positions * args.vocab * 4 / 2**20
    summary: dict = {
        "bench": "loss",
        "positions": args.positions,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "k": args.k,
        "kind": args.kind,
        "temperature": args.temperature,
        "chunk_size": args.chunk_size,
        "threads": naive["threads"],
        "one_logits_tensor_mib": round(logits_mib, 1),
        "goals": {"memory_ratio_below": 0.15, "time_ratio_at_most": 1.0},
    }
    for name, res in results.items():
        summary[name] = {
            "peak_mib": round(res["peak_mib"], 1),
            "seconds": round(res["seconds"], 3),
            "cpu_seconds": round(res["cpu_seconds"], 3),
            "loss": res["loss"],
        }
        if name != "naive":
            summary[name] |= {
                "memory_ratio": round(res["peak_mib"] / naive["peak_mib"], 4),
                "time_ratio": round(res["seconds"] / naive["seconds"], 4),
                "cpu_time_ratio": round(res["cpu_seconds"] / naive["cpu_seconds"], 4),
                "loss_rel_diff": abs(res["loss"] - naive["loss"]) / abs(naive["loss"]),
                "head_grad_norm_rel_diff": abs(res["head_grad_norm"] - naive["head_grad_norm"])
                / naive["head_grad_norm"],
            }
    print(
        f"{'variant':<18}{'peak MiB':>10}{'mem ratio':>11}{'wall s':>9}{'ratio':>8}"
        f"{'cpu s':>9}{'ratio':>8}",
        file=sys.stderr,
    )
    for name in results:
        row = summary[name]
        print(
            f"{name:<18}{row['peak_mib']:>10.1f}{row.get('memory_ratio', 1.0):>11.3f}"
            f"{row['seconds']:>9.2f}{row.get('time_ratio', 1.0):>8.3f}"
            f"{row['cpu_seconds']:>9.2f}{row.get('cpu_time_ratio', 1.0):>8.3f}",
            file=sys.stderr,
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
