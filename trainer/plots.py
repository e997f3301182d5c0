"""PNG plot of the training curves from the JSONL step log (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def plot_log(log_path: str | Path, png_path: str | Path, *, title: str | None = None) -> Path:
    """Loss / CE / divergence, learning rate, grad norm and throughput against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    for key, label in (("loss", "loss"), ("ce", "CE"), ("divergence", "divergence")):
        ax.plot(steps, [r[key] for r in records], label=label)
    ax.set_title("objective (mean over response tokens)")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[0][1]
    ax.plot(steps, [r["lr"] for r in records])
    ax.set_title("learning rate")
    ax.set_xlabel("step")
    ax = axes[1][0]
    ax.plot(steps, [r["grad_norm"] for r in records])
    ax.set_title("grad norm (before clipping)")
    ax.set_xlabel("step")
    ax = axes[1][1]
    ax.plot(steps, [r["tokens_per_s"] for r in records], label="tokens/s")
    ax.set_title("throughput (response tokens/s)")
    ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
