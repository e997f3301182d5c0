"""Checkpoints: what a worker saves (model, optimizer, schedule, data position, RNG), how it
reaches Ray Train's storage, how a restarted worker restores it, and the final export.

DDP: rank 0 writes an HF folder plus `trainer_state.pt` (optimizer included). FSDP: every
worker writes its shards of model and optimizer (torch distributed checkpoint, `sharded/`),
rank 0 the rest; the run's last checkpoint also holds the gathered HF folder, which is what
`export_model` hands out as `out/model`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from todi.trainer.config import TrainConfig
from todi.trainer.errors import TrainError
from todi.trainer.strategy import barrier
from todi.trainer.student import build_student, save_student, tied_keys

STATE_FILE = "trainer_state.pt"
SHARDED = "sharded"  # FSDP: torch distributed checkpoint of model + optimizer shards


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    directory: Path, model, tokenizer, optimizer, scheduler, state: dict[str, Any]
) -> None:
    """An HF folder (loadable as is) plus `trainer_state.pt` (optimizer, schedule, data, RNG).

    DDP (and one worker): rank 0 alone writes it, the model and optimizer being whole there."""
    save_student(model, tokenizer, directory)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
        directory / STATE_FILE,
    )


def write_sharded_checkpoint(
    directory: Path,
    model,
    tokenizer,
    objective: torch.nn.Module,
    optimizer,
    scheduler,
    state: dict[str, Any],
    *,
    rank: int,
    full_weights: bool,
) -> None:
    """FSDP: every worker writes its own shards of model and optimizer (torch distributed
    checkpoint, `sharded/`: one `__RANK_0.distcp` file per worker plus `.metadata`); rank 0
    adds `trainer_state.pt` (schedule, data positions, RNG), the config and the tokenizer.

    With `full_weights` (the run's last checkpoint) the parameters are also gathered, one
    tensor at a time, into rank 0's memory and saved as an HF folder (`model.safetensors`):
    what `export_model` hands out. A collective: every worker calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(objective, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory / SHARDED)
    weights = full_state_dict(model) if full_weights else None
    if rank == 0:
        if weights is not None:
            # A tied head is saved once, under the embeddings' name, as save_pretrained does
            # for an unsharded model (the DDP export has the same tensors).
            tied = tied_keys(model)
            weights = {k: v for k, v in weights.items() if k not in tied}
            model.save_pretrained(directory, state_dict=weights, safe_serialization=True)
        else:
            model.config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        torch.save({"scheduler": scheduler.state_dict(), **state}, directory / STATE_FILE)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict on rank 0 (CPU), None elsewhere; FSDP's DTensor shards gathered
    one tensor at a time (a tied tensor once). A collective: every worker calls it."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if id(t) not in done:
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            done[id(t)] = full.detach().cpu() if rank == 0 else full[:0]
        if rank == 0:
            out[name] = done[id(t)]
    return out if rank == 0 else None


def report_checkpoint(
    ctx, metrics: dict[str, Any], name: str, write, *, all_ranks: bool = False
) -> None:
    """Report `metrics` with a checkpoint that `write(directory)` fills.

    On a local-disk run directory the checkpoint is written in place and reported without
    an upload (no second copy of model + optimizer); elsewhere (s3://, ...) it is written
    to a temporary folder that Ray Train uploads. `all_ranks` (sharded checkpoints): every
    worker calls this and writes its part; Ray Train merges the workers' folders into one."""
    import pyarrow.fs as pafs
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    storage = None
    with contextlib.suppress(Exception):  # get_storage is a developer API: fall back
        storage = ctx.get_storage()
    if storage is not None and isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
        path = Path(storage.build_checkpoint_path_from_name(name))
        if not all_ranks or ctx.get_world_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # a partial one from a crashed attempt
            path.mkdir(parents=True)
        if all_ranks:
            barrier()  # the folder exists (and is empty) before any worker writes
        write(path)
        if all_ranks:
            barrier()  # every part is written before any worker reports the checkpoint
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(path)),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )
        return
    tmp = Path(tempfile.mkdtemp(prefix="todi-ckpt-"))
    try:
        write(tmp)
        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_start(d: Path | None, lc: dict[str, Any], cfg: TrainConfig, world: int):
    """(model, tokenizer, checkpoint state or None) to start from: the checkpoint folder `d`
    Ray Train hands this worker (a restart or `--resume`), else the student built from
    `lc["student_dir"]`. A sharded checkpoint's weights are loaded later, into the sharded
    model (`restore_training_state`); the model starts as the initial student then."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if d is None:
        model, tokenizer = build_student(lc["student_dir"], seed=cfg.seed)
        return model, tokenizer, None
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
    if state["world_size"] != world:
        raise TrainError(
            f"checkpoint at step {state['step']} was written by {state['world_size']} "
            f"workers, this run has {world}: resume with --workers {state['world_size']}"
        )
    if (d / SHARDED).is_dir():
        model, _ = build_student(lc["student_dir"], seed=cfg.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(d), state


def restore_training_state(
    d: Path, state: dict[str, Any], objective: torch.nn.Module, optimizer, scheduler
) -> None:
    """Model (sharded checkpoints), optimizer and schedule from checkpoint `d`, into the
    wrapped objective and its optimizer (a collective for sharded checkpoints)."""
    if (d / SHARDED).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(objective, optimizer)
        both = {"model": model_state, "optimizer": optim_state}
        dcp.load(both, checkpoint_id=d / SHARDED)
        set_state_dict(
            objective,
            optimizer,
            model_state_dict=both["model"],
            optim_state_dict=both["optimizer"],
        )
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def export_model(result: Any, out: Path) -> Path:
    """The last checkpoint as `out/model` (an HF folder, without the trainer state)."""
    if result.checkpoint is None:
        raise TrainError("training finished without a checkpoint to export")
    model_dir = out / "model"
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    (tmp / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(tmp / SHARDED, ignore_errors=True)
    if not any(tmp.glob("*.safetensors")):
        raise TrainError(f"the last checkpoint ({result.checkpoint.path}) holds no model weights")
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    return model_dir
