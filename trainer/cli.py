"""`todi train`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from todi.common.cli import user_errors


def train_command(
    shards: str = typer.Option(None, "--shards", help="Shard set folder or URI (s3://...)."),
    student: str = typer.Option(
        None,
        "--student",
        help="HF folder | init:teacher=DIR,layers=N | init:config=FILE[,tokenizer=DIR].",
    ),
    out: str = typer.Option(None, "--out", help="Output folder (model/, log, plot, ray/)."),
    config: Path = typer.Option(
        None, "--config", help="YAML/TOML file with the same settings; flags override it."
    ),
    loss: str = typer.Option(None, "--loss", help="Divergence: todi fkl rkl js tvd skl srkl akl."),
    beta: float = typer.Option(None, "--beta", help="ToDi sigmoid sharpness [1.0]."),
    kd_weight: float = typer.Option(None, "--kd-weight", help="Weight of the divergence [0.5]."),
    temperature: float = typer.Option(
        None, "--temperature", help="Must equal the shard set's temperature (default: taken)."
    ),
    chunk_size: int = typer.Option(None, "--chunk-size", help="Positions per head chunk [1024]."),
    topk_target: str = typer.Option(
        None,
        "--topk-target",
        help="tail (k ids + tail bucket) | spread (the rest spread over the other ids) | "
        "renormalized (k ids only, ablation) [tail].",
    ),
    sampled_estimator: str = typer.Option(
        None,
        "--sampled-estimator",
        help="Sampled sets: bucketed (student side over listed ids + a bucket) | unbiased "
        "[bucketed].",
    ),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the data [1]."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (overrides epochs)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Sequences per micro-batch [8]."),
    max_tokens: int = typer.Option(
        None, "--max-tokens", help="Padded tokens cap per micro-batch (needs --max-steps)."
    ),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per step [1]."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate [1e-4]."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Linear warm-up steps [0]."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW decay [0.01]."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Max grad norm, 0 = off [1.0]."),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast [GPU only]."),
    seed: int = typer.Option(None, "--seed", help="Seed of data order and init [0]."),
    shuffle_buffer: int = typer.Option(None, "--shuffle-buffer", help="Samples [1024]."),
    bucket_buffer: int = typer.Option(
        None, "--bucket-buffer", help="Samples sorted by length together, 0 = off [256]."
    ),
    verify: bool = typer.Option(
        None, "--verify/--no-verify", help="Checksum every shard before training [on]."
    ),
    allow_incomplete: bool = typer.Option(
        None, "--allow-incomplete", help="Train on a set still marked incomplete."
    ),
    workers: int = typer.Option(None, "--workers", help="Ray Train workers [2]."),
    strategy: str = typer.Option(
        None,
        "--strategy",
        help="ddp (whole student per worker) | fsdp (parameters, gradients, optimizer state "
        "sharded over the workers) [ddp].",
    ),
    gradient_checkpointing: bool = typer.Option(
        None,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute decoder-layer activations in backward (less memory) [off].",
    ),
    cpus_per_worker: float = typer.Option(None, "--cpus-per-worker", help="[1]."),
    placement_strategy: str = typer.Option(
        None,
        "--placement-strategy",
        help="PACK | SPREAD | STRICT_PACK | STRICT_SPREAD: workers on one node or on many [PACK].",
    ),
    use_gpu: bool = typer.Option(None, "--gpu/--no-gpu", help="GPU workers [if available]."),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Join a cluster: auto | ray://host:port (default: local)."
    ),
    max_failures: int = typer.Option(
        None, "--max-failures", help="Restarts from the last checkpoint after a failure [2]."
    ),
    jemalloc: bool = typer.Option(
        None, "--jemalloc/--no-jemalloc", help="Preload ray's jemalloc in workers [off]."
    ),
    checkpoint_every: int = typer.Option(
        None, "--checkpoint-every", help="Steps between checkpoints, 0 = end only [0]."
    ),
    keep_checkpoints: int = typer.Option(None, "--keep-checkpoints", help="[2]."),
    resume: bool = typer.Option(None, "--resume", help="Continue the run in --out exactly."),
    stop_at_step: int = typer.Option(
        None, "--stop-at-step", help="Stop after this step with a checkpoint (time-boxing)."
    ),
    online_teacher: str = typer.Option(
        None, "--online-teacher", help="Compute targets with this HF teacher (comparison)."
    ),
    online_quantize: bool = typer.Option(
        None, "--online-quantize", help="Round online targets through the shard codec."
    ),
    online_full_vocab: bool = typer.Option(
        None, "--online-full-vocab", help="Online targets over the full vocabulary (k = V)."
    ),
    report_to: str = typer.Option(
        None,
        "--report-to",
        help="Experiment trackers, comma-separated: tensorboard,mlflow,wandb | all | none "
        "[none]. Offline, under --out.",
    ),
    eval_shards: str = typer.Option(
        None, "--eval-shards", help="Held-out shard set: evaluate the exported model at the end."
    ),
    eval_max_samples: int = typer.Option(
        None, "--eval-max-samples", help="Evaluate only the first N held-out samples."
    ),
    eval_every: int = typer.Option(
        None, "--eval-every", help="Also evaluate on --eval-shards every N steps [0: end only]."
    ),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar [on]."),
) -> None:
    """Train a student on a shard set with Ray Train (DDP or FSDP), ToDi or another divergence."""
    overrides = {k: v for k, v in locals().items() if k != "config"}  # None = not given
    from todi.trainer.config import load_config
    from todi.trainer.train import train

    with user_errors():  # every TodiError (config, data, student, train, shards, teacher)
        cfg = load_config(config, overrides)
        summary = train(cfg, teacher_engine=_teacher_engine)
    typer.echo(json.dumps(summary.to_dict()))
    typer.echo(
        f"model   {summary.model_dir}\nlog     {summary.log}\nplot    {summary.plot}\n"
        f"steps   {summary.steps}   loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}"
        f"   {summary.seconds:.0f} s"
        if summary.first_loss is not None
        else f"model   {summary.model_dir}"
    )


# Starts `--online-teacher` engines in the workers; set by whoever registers the command (the
# root CLI passes the teacher service's hf backend), so this package stays below the service.
_teacher_engine: Callable[..., Any] | None = None


def register(app: typer.Typer, *, teacher_engine: Callable[..., Any] | None = None) -> None:
    """Add `train` to the root app (`eval` is `todi.trainer.eval_cli`)."""
    global _teacher_engine
    _teacher_engine = teacher_engine
    app.command("train")(train_command)
