"""Checkpoints: what a worker saves (model, optimizer, schedule, data position, RNG), how it
reaches Ray Train's storage, how a restarted worker restores it, and the final export.
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
from todi.trainer.student import build_student, save_student

STATE_FILE = "trainer_state.pt"


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
    """An HF folder (loadable as is) plus `trainer_state.pt` (optimizer, schedule, data, RNG)."""
    save_student(model, tokenizer, directory)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
        directory / STATE_FILE,
    )


def report_checkpoint(ctx, metrics: dict[str, Any], name: str, write) -> None:
    """Report `metrics` with a checkpoint that `write(directory)` fills.

    On a local-disk run directory the checkpoint is written in place and reported without
    an upload (no second copy of model + optimizer); elsewhere (s3://, ...) it is written
    to a temporary folder that Ray Train uploads."""
    import pyarrow.fs as pafs
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    storage = None
    with contextlib.suppress(Exception):  # get_storage is a developer API: fall back
        storage = ctx.get_storage()
    if storage is not None and isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
        path = Path(storage.build_checkpoint_path_from_name(name))
        shutil.rmtree(path, ignore_errors=True)  # a partial one from a crashed attempt
        path.mkdir(parents=True)
        write(path)
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


def restore_or_build(lc: dict[str, Any], cfg: TrainConfig, world: int):
    """(model, tokenizer, checkpoint state or None): the last checkpoint Ray Train hands this
    worker (a restart or `--resume`), else the student built from `lc["student_dir"]`."""
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        model, tokenizer = build_student(lc["student_dir"], seed=cfg.seed)
        return model, tokenizer, None
    with checkpoint.as_directory() as d:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(d)
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    if state["world_size"] != world:
        raise TrainError(
            f"checkpoint at step {state['step']} was written by {state['world_size']} "
            f"workers, this run has {world}: resume with --workers {state['world_size']}"
        )
    return model, tokenizer, state


def export_model(result: Any, out: Path) -> Path:
    """The last checkpoint as `out/model` (an HF folder, without the trainer state)."""
    if result.checkpoint is None:
        raise TrainError("training finished without a checkpoint to export")
    model_dir = out / "model"
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    (tmp / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    return model_dir
