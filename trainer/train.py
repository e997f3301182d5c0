"""Student training on a shard set with Ray Train (`TorchTrainer`, DDP).

The objective of one optimizer step (docs/method.md, "The objective"):

    loss = ((1 - w) * sum_n CE_n + w * sum_n D(p_n || q_n)) / N_global

summed over the response positions n of every micro-batch of the step on every worker, with
N_global their number (all-reduced across workers, summed over accumulation micro-batches):
the mean over the response tokens of the GLOBAL batch. CE is at T = 1 on the next token; D
is the sparse divergence (k teacher ids + tail bucket) at the shard set's temperature T.
Each worker passes its sums over N_global / W to backward; DDP averages gradients over the W
workers, so the result is exactly the gradient of the global mean (`loss_denominator`).

The student's [positions, vocab] logits never exist at once: the base model runs to the
last hidden state (no lm_head), the response positions are gathered, and
`chunked_head_loss` computes logits chunk by chunk from the head weight. Training passes the
step's kd_weight, so the fused path runs: forward also makes each chunk's gradients (as Liger's
fused linear cross-entropy does) and backward only scales them; nothing is recomputed.

Driver (`train`): checks the shard set and the student (tokenizer, vocabulary, temperature)
before anything starts, materializes an `init:` student once as an HF folder, starts or
joins Ray, runs the `TorchTrainer`, streams per-step metrics from rank 0 through a Ray queue
into `train_log.jsonl` and a tqdm bar, and exports the last checkpoint as `model/` (an HF
folder) with `curves.png`.

Workers (`_worker_loop`): data (see `todi.trainer.data`), AdamW (weight decay on matrices only),
cosine schedule with optional linear warm-up, grad-norm clipping, bf16 autocast, Ray Train
checkpoints every N steps holding model, optimizer, scheduler, data position and RNG states.
A restart (worker failure, `--resume`) loads the last checkpoint and skips the data stream
to the saved position: the continued run computes what the uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from todi.common.errors import TodiError, first_line
from todi.storage import IGNORE_INDEX, Batch, ShardSetMetadata
from todi.storage.fs import is_uri
from todi.trainer.chunked import chunked_head_loss
from todi.trainer.config import TrainConfig, trajectory_differences
from todi.trainer.data import (
    DataError,
    LoaderSettings,
    check_pairing,
    decode_rows,
    dummy_batch,
    epoch_batches,
    micro_batches_per_epoch,
    open_for_training,
    padding_counts,
    raw_rows,
)
from todi.trainer.divergences import check_kind_for_weights
from todi.trainer.objective import distillation_loss, loss_denominator
from todi.trainer.online import TeacherFactory
from todi.trainer.student import (
    StudentError,
    body_and_head,
    build_student,
    describe_student,
    parse_student_spec,
    save_student,
)
from todi.trainer.tracking import finish_run, open_run_trackers

RUN_NAME = "train"
STATE_FILE = "trainer_state.pt"
LOG_NAME = "train_log.jsonl"
PLOT_NAME = "curves.png"
CONFIG_NAME = "train_config.json"
FAULT_ENV = "TODI_TRAIN_FAULT"
"""Fault injection for tests: `kill:STEP:RANK:MARKER` makes worker RANK SIGKILL itself right
after optimizer step STEP, once (MARKER, a file path, records that it happened)."""


class TrainError(TodiError, RuntimeError):
    """A training run that could not start or finish; the message says why."""


# ------------------------------------------------------------------------------------------
# The objective module


class StudentObjective(nn.Module):
    """Wraps the student so DDP sees one forward: batch -> (CE sum, divergence sum).

    The forward runs the base model (final norm included, no lm_head) to the last hidden
    state, keeps the response positions and hands them with the head weight to
    `chunked_head_loss`. The head is sliced to `vocab_limit` rows (the vocabulary rule in
    `todi.trainer.data.check_pairing`): padding rows are outside the softmax.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        beta: float,
        temperature: float,
        chunk_size: int,
        vocab_limit: int | None = None,
        bf16: bool = False,
        kd_weight: float | None = None,
        tail: bool = True,
    ) -> None:
        super().__init__()
        self.tail = tail  # False: renormalized top-k, no tail bucket (chunked_head_loss)
        self.model = model
        self.kind, self.beta, self.temperature = kind, beta, temperature
        self.chunk_size = chunk_size
        self.vocab_limit = vocab_limit
        self.bf16 = bf16
        # With the objective's kd_weight known, chunked_head_loss makes the head gradients
        # chunk by chunk during forward (one head matmul less than recomputing in backward).
        self.kd_weight = kd_weight
        _, weight, _ = body_and_head(model)  # fail early on a model without a linear head
        # The padding rows of a padded head are outside the softmax, so they get no gradient;
        # AdamW's decoupled weight decay would still shrink them every step. Their values are
        # kept here and put back after each step (`restore_padding_rows`): exported unchanged.
        self._padding_rows = (
            weight.detach()[vocab_limit:].clone()
            if vocab_limit is not None and vocab_limit < weight.shape[0]
            else None
        )

    @torch.no_grad()
    def restore_padding_rows(self) -> None:
        """Undo what the optimizer did to the head's padding rows (weight decay)."""
        if self._padding_rows is not None:
            _, weight, _ = body_and_head(self.model)
            weight[self.vocab_limit :].copy_(self._padding_rows)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_logprobs: torch.Tensor,
        target_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        body, weight, bias = body_and_head(self.model)
        dev = input_ids.device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = body(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        mask = labels != IGNORE_INDEX
        if self.vocab_limit is not None and self.vocab_limit < weight.shape[0]:
            weight = weight[: self.vocab_limit]
            bias = None if bias is None else bias[: self.vocab_limit]
        parts = chunked_head_loss(
            hidden[mask],
            weight,
            bias,
            labels[mask],
            topk_ids[mask],
            topk_logprobs[mask],
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            kd_weight=self.kd_weight,
            tail=self.tail,
            weights=None if target_weights is None else target_weights[mask],
        )
        return parts.ce_sum, parts.div_sum


def batch_sums(objective: nn.Module, batch: Batch, device: torch.device | str = "cpu"):
    """(CE sum, divergence sum) of one batch through `objective` (a StudentObjective or DDP)."""
    b = batch.to(device)
    return objective(
        b.input_ids, b.attention_mask, b.labels, b.topk_ids, b.topk_logprobs, b.target_weights
    )


# ------------------------------------------------------------------------------------------
# Optimizer, schedule, one step


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings, projections), none on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps ((s + 1) / (warmup + 1): never 0, so no step is
    wasted), then cosine from 1 to 0 over the remaining steps (paper default: no warm-up)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total)
    )


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device() -> torch.device:
    if _dist() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum/max of a few numbers over all workers (identity without dist)."""
    if not _dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(t, op=red)
    return t.cpu().tolist()


@dataclass
class StepStats:
    ce_sum: float
    div_sum: float
    tokens: int  # this worker's counted positions
    real_tokens: int
    padded_slots: int
    grad_norm: float
    lr: float


def train_step(
    objective: nn.Module,
    micro_batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    kd_weight: float,
    grad_clip: float,
    device: torch.device | str = "cpu",
) -> StepStats:
    """One optimizer step over this worker's micro-batches (>= 1; all workers call it).

    Every micro-batch's loss uses the same denominator, the step's global token count over
    the world size (`loss_denominator`), so accumulation and DDP averaging together give the
    gradient of the mean over all response tokens of the global batch. Under DDP only the
    last micro-batch synchronizes gradients (`no_sync` for the others)."""
    local = sum(b.num_tokens for b in micro_batches)
    denom = loss_denominator(local)
    ce_total = div_total = 0.0
    real = padded = 0
    ddp = isinstance(objective, nn.parallel.DistributedDataParallel)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or not ddp) else objective.no_sync()
        with sync:
            ce_sum, div_sum = batch_sums(objective, batch, device)
            loss = distillation_loss(ce_sum, div_sum, denom, kd_weight)
            loss.backward()
        ce_total += float(ce_sum.detach())
        div_total += float(div_sum.detach())
        r, p = padding_counts(batch)
        real += r
        padded += p
    params = [p for p in objective.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = float(scheduler.get_last_lr()[0])
    optimizer.step()
    inner = objective.module if ddp else objective
    if isinstance(inner, StudentObjective):
        inner.restore_padding_rows()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(ce_total, div_total, local, real, padded, grad_norm, lr)


# ------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    if not _dist():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def write_checkpoint(
    directory: Path, model, tokenizer, optimizer, scheduler, state: dict[str, Any]
) -> None:
    """An HF folder (loadable as is) plus `trainer_state.pt` (optimizer, schedule, data, RNG)."""
    save_student(model, tokenizer, directory)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
        directory / STATE_FILE,
    )


# ------------------------------------------------------------------------------------------
# The worker


def _maybe_fault(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, at_step, at_rank, marker = spec.split(":", 3)
    if kind != "kill" or int(at_step) != step or int(at_rank) != rank or os.path.exists(marker):
        return
    Path(marker).write_text(f"killed rank {rank} after step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _report_checkpoint(ctx, metrics: dict[str, Any], name: str, write) -> None:
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


def _row_stream(data_iter, schema_box: list):
    """Raw rows of this worker's split, block by block; the blocks' schema goes in the box."""
    for table in data_iter.iter_batches(
        batch_size=None, batch_format="pyarrow", prefetch_batches=2
    ):
        schema, rows = raw_rows(table)
        schema_box[:] = [schema]
        yield from rows


def _worker_loop(lc: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: `lc` is the driver's `train_loop_config`."""
    _Worker(lc).run()


def _restore_or_build(lc: dict[str, Any], cfg: TrainConfig, world: int):
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


def _worker_objective(
    model: nn.Module, cfg: TrainConfig, lc: dict[str, Any], device: torch.device, world: int
) -> nn.Module:
    """The StudentObjective of this worker, wrapped in DDP when there are several."""
    # bf16 autocast "where supported" is decided here, where the device is (the driver may
    # run on a CPU-only head node).
    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    objective: nn.Module = StudentObjective(
        model,
        kind=cfg.loss,
        beta=cfg.beta,
        temperature=lc["temperature"],
        chunk_size=cfg.chunk_size,
        vocab_limit=lc["vocab_limit"],
        bf16=bf16,
        kd_weight=cfg.kd_weight,
        tail=cfg.topk_target == "tail",
    )
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    return objective


class _Worker:
    """One worker's run: restore or build (`__init__`), then epochs (`_epoch`) of steps, each
    gathering micro-batches (`_gather`), stepping (`_step`) and recording (`_record`);
    checkpoints through `_report`.

    The data position (`position`, micro-batches consumed in `epoch`) is what a checkpoint
    saves per rank: a restart skips that many plans of the epoch, whose order is a pure
    function of (seed, epoch, rank), so the continued run computes what the uninterrupted
    run computes.
    """

    def __init__(self, lc: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-worker weight-loading bars would garble the log
        self.lc = lc
        self.cfg = cfg = TrainConfig.model_validate(lc["config"])
        self.meta = ShardSetMetadata.model_validate(lc["meta"])
        self.ctx = ray.train.get_context()
        self.rank, self.world = self.ctx.get_world_rank(), self.ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        torch.manual_seed(cfg.seed)

        self.model, self.tokenizer, state = _restore_or_build(lc, cfg, self.world)
        self.model.to(self.device)
        self.model.train()
        self.objective = _worker_objective(self.model, cfg, lc, self.device, self.world)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(
            self.optimizer, warmup=cfg.warmup_steps, total=lc["total_steps"]
        )
        self.step, self.epoch, self.position = 0, 0, 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch = state["step"], state["epoch"]
            self.position = state["positions"][self.rank]
            _set_rng_state(state["rng"][self.rank])
        self.last_saved = self.step if state is not None else -1

        self.online = None
        if cfg.online_teacher:
            from todi.trainer.online import OnlineTeacher

            self.online = OnlineTeacher(
                cfg.online_teacher,
                self.meta,
                quantize=cfg.online_quantize,
                full_vocab=cfg.online_full_vocab,
                device=str(self.device),
                vocab_limit=lc["vocab_limit"],
                engine=lc["teacher_engine"],
            )
        self.settings = LoaderSettings(
            batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens,
            shuffle_buffer=cfg.shuffle_buffer,
            bucket_buffer=cfg.effective_bucket_buffer,
            seed=cfg.seed,
        )
        self.data_iter = ray.train.get_dataset_shard("train")
        self.pad_id = int(lc["pad_id"])
        self.t_start = time.perf_counter()

    def run(self) -> None:
        cfg = self.cfg
        max_steps, stop_at = cfg.max_steps, cfg.stop_at_step
        done = (max_steps is not None and self.step >= max_steps) or (
            max_steps is None and self.epoch >= cfg.epochs
        )
        while not done:
            done = self._epoch()
            if not done:
                self.epoch += 1
                self.position = 0  # a checkpoint now means "epoch `epoch`, nothing consumed yet"
                if max_steps is None and self.epoch >= cfg.epochs:
                    done = True
        stopped = (
            stop_at is not None
            and self.step >= stop_at
            and not (max_steps is not None and self.step >= max_steps)
        )
        final = {"step": self.step, "finished": not stopped, "stopped_early": stopped}
        self._report(final, save=self.last_saved != self.step)
        if self.online is not None:
            self.online.close()

    def _epoch(self) -> bool:
        """Steps of this epoch from `position` on; True when the run is done (max or stop
        step reached), False when every worker's data of the epoch ran out."""
        cfg = self.cfg
        schema_box: list = []
        plans = epoch_batches(
            _row_stream(self.data_iter, schema_box), self.settings, epoch=self.epoch, rank=self.rank
        )
        for _ in range(self.position):  # resume: skip the micro-batches already consumed
            next(plans, None)
        epoch_start, epoch_steps = self.position, 0
        done = False
        while not done:
            t0 = time.perf_counter()
            micro = self._gather(plans, schema_box)
            t_loaded = time.perf_counter()
            (most,) = all_reduce([len(micro)], op="max")
            if most == 0:
                break  # every worker finished this epoch
            self.position += len(micro)
            record = self._step(micro, t0, t_loaded)
            epoch_steps += 1
            done = (cfg.max_steps is not None and self.step >= cfg.max_steps) or (
                cfg.stop_at_step is not None and self.step >= cfg.stop_at_step
            )
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not done:
                self._report({"step": self.step, "loss": record["loss"]}, save=True)
            _maybe_fault(self.step, self.rank)
        if epoch_steps == 0 and epoch_start == 0:
            raise TrainError(
                f"epoch {self.epoch} gave no micro-batch to any worker: the shard set's rows do "
                f"not reach the {self.world} workers (each needs at least one row)"
            )
        return done

    def _gather(self, plans, schema_box: list) -> list[Batch]:
        """Up to `grad_accum` micro-batches of this worker (fewer, or none, at the epoch's end)."""
        micro = []
        for _ in range(self.cfg.grad_accum):
            plan = next(plans, None)
            if plan is None:
                break
            micro.append(
                decode_rows(
                    plan,
                    self.meta,
                    schema_box[0],
                    pad_id=self.pad_id,
                    vocab_limit=self.lc["vocab_limit"],
                    temperature=self.lc["temperature"],
                )
            )
        return micro

    def _step(self, micro: list[Batch], t0: float, t_loaded: float) -> dict[str, Any]:
        """One optimizer step over `micro` (all workers take it); its record."""
        if not micro:
            micro = [dummy_batch(self.meta.top_k, self.pad_id)]  # data ran out here first
        teacher_s = 0.0
        if self.online is not None:
            t1 = time.perf_counter()
            micro = [self.online.fill(b) if b.sample_ids else b for b in micro]
            teacher_s = time.perf_counter() - t1
        stats = train_step(
            self.objective,
            micro,
            self.optimizer,
            self.scheduler,
            kd_weight=self.cfg.kd_weight,
            grad_clip=self.cfg.grad_clip,
            device=self.device,
        )
        self.step += 1
        n_seqs = sum(len(b.sample_ids) for b in micro)
        return self._record(stats, n_seqs, t0, t_loaded, teacher_s)

    def _record(
        self, stats: StepStats, n_seqs: int, t0: float, t_loaded: float, teacher_s: float
    ) -> dict[str, Any]:
        """The step's metrics over all workers, sent to the driver by rank 0."""
        ce, div, tokens, real, padded, seqs = all_reduce(
            [
                stats.ce_sum,
                stats.div_sum,
                stats.tokens,
                stats.real_tokens,
                stats.padded_slots,
                n_seqs,
            ]
        )
        dt = time.perf_counter() - t0
        tokens = max(tokens, 1.0)  # a step without counted tokens logs zeros, not NaN
        w = self.cfg.kd_weight
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": ((1 - w) * ce + w * div) / tokens,
            "ce": ce / tokens,
            "divergence": div / tokens,
            "tokens": int(tokens),
            "sequences": int(seqs),
            "tokens_per_s": tokens / dt,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "padding_waste": 1.0 - real / max(padded, 1.0),
            "step_s": dt,
            "loader_s": t_loaded - t0,
            "teacher_s": teacher_s,
            "elapsed_s": time.perf_counter() - self.t_start,
        }
        if self.rank == 0 and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            record.update(self._heldout())
        queue = self.lc["queue"]
        if self.rank == 0 and queue is not None:
            queue.put(record)
        return record

    def _heldout(self) -> dict[str, float]:
        """`--eval-every`: the held-out shard metrics of the model as it is now, as `eval_*`
        (rank 0 only; the other workers wait at the next step's all-reduce). Evaluation draws
        no random numbers, so the run itself is the same with or without it."""
        from todi.trainer.evaluate import evaluate_shards

        cfg = self.cfg
        metrics = evaluate_shards(
            self.model,
            cfg.eval_shards,
            beta=cfg.beta,
            max_samples=cfg.eval_max_samples,
            tokenizer=self.tokenizer,
        )
        keys = ("fkl", "rkl", "todi", "top1_agreement", "ce", "teacher_topk_mass", "ece", "seconds")
        return {f"eval_{k}": float(metrics[k]) for k in keys}

    def _report(self, metrics: dict[str, Any], save: bool) -> None:
        """Report `metrics` to Ray Train, with a checkpoint (written by rank 0) if `save`."""
        import ray.train

        positions = _gather(self.position)
        rngs = _gather(_rng_state())
        if self.rank == 0 and save:
            ckpt_state = {
                "step": self.step,
                "epoch": self.epoch,
                "positions": positions,
                "rng": rngs,
                "world_size": self.world,
                "config": self.lc["config"],
            }

            def write(d: Path) -> None:
                write_checkpoint(
                    d, self.model, self.tokenizer, self.optimizer, self.scheduler, ckpt_state
                )

            _report_checkpoint(self.ctx, metrics, f"step-{self.step:08d}", write)
        else:
            ray.train.report(metrics, checkpoint=None)
        if save:
            self.last_saved = self.step


# ------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainSummary:
    out: str
    model_dir: str
    log: str
    plot: str | None
    steps: int
    first_loss: float | None
    last_loss: float | None
    stopped_early: bool
    resumed: bool
    seconds: float
    temperature: float
    vocab_limit: int
    jemalloc: str | None
    startup_s: float | None  # fit() until the first step began (cluster, workers, model)
    eval: dict[str, Any] | None = None  # --eval-shards: the exported model's held-out metrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _MetricsSink:
    """Drains rank 0's per-step records: JSONL log (one line per step) + tqdm bar.

    A restart or resume replays steps after its checkpoint: a record whose step is not past
    the last one truncates the log back to before it, so every step appears once."""

    def __init__(
        self, queue, log_path: Path, total: int | None, progress: bool, trackers=None
    ) -> None:
        self.queue = queue
        self.trackers = trackers  # trainer.tracking.Trackers: --report-to
        self.log_path = log_path
        self.records: list[dict] = []
        if log_path.is_file():
            self.records = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
        self._stop = threading.Event()
        self.first_at: float | None = None  # perf_counter when this run's first record came
        self.first_record: dict | None = None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
            if self.records:
                self.bar.update(self.records[-1]["step"])
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                record = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (cluster shutting down)
                return
            self._add(record)

    def _add(self, record: dict) -> None:
        if self.records and record["step"] <= self.records[-1]["step"]:
            self.records = [r for r in self.records if r["step"] < record["step"]]
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            if self.bar is not None:
                self.bar.reset(total=self.bar.total)
                self.bar.update(len(self.records))
        if self.first_at is None:
            self.first_at, self.first_record = time.perf_counter(), record
        self.records.append(record)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            self.trackers.log_step(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
            )

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        with contextlib.suppress(Exception):
            for record in self.queue.get_nowait_batch(self.queue.qsize()):
                self._add(record)
        if self.bar is not None:
            self.bar.close()


def jemalloc_path() -> str | None:
    """Ray's bundled jemalloc (`ray/core/libjemalloc.so`), if this ray wheel has it.

    `--jemalloc` preloads it in the training workers (runtime_env env_vars LD_PRELOAD). Off by
    default: measured with bench/bench_train.py (10-layer student, CPU) it did not speed up
    a step (CPU time 0.89x, wall 1.03x, within noise), since the chunked loss never holds
    [positions, vocab] tensors beyond one chunk; the large mmap/munmap churn that jemalloc
    removes belongs to the naive full-logits loss."""
    import ray

    path = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    return str(path) if path.is_file() else None


def _absolute_local(location: str) -> str:
    return location if is_uri(location) else str(Path(location).absolute())


def _schedule_total(cfg: TrainConfig, rows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_worker = rows // cfg.workers
    micro = micro_batches_per_epoch(per_worker, cfg.batch_size)
    return max(1, cfg.epochs * -(-micro // cfg.grad_accum))


def _connect_ray(cfg: TrainConfig) -> bool:
    """Join `ray_address`, reuse an initialized Ray, or start a local one. True if started."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray_address:
        from todi.common.raycluster import join_cluster

        join_cluster(cfg.ray_address, log_to_driver=False)
        return True
    needed = math.ceil(cfg.workers * cfg.cpus_per_worker) + 1  # + 1: Ray Data, controller
    ray.init(
        num_cpus=max(os.cpu_count() or 1, needed),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def _use_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= cfg.workers


def _data_errors_are_final():
    """A Ray Train callback that ends the run at a worker's data error (a corrupt or missing
    shard): retrying from a checkpoint would read the same bytes again. Raising in the
    controller's hook stops it without the `max_failures` worker-group restarts; the driver
    then reports the worker's own message (`_root_error`)."""
    from ray.train import UserCallback

    class DataErrorsAreFinal(UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            for exc in worker_exceptions.values():
                if _data_error(exc) is not None:
                    raise TrainError(_root_error(exc))

    return DataErrorsAreFinal()


def _data_error(exc: BaseException) -> BaseException | None:
    """The ShardFormatError / DataError in `exc`'s causes, if any."""
    from todi.storage import ShardFormatError

    pending, seen = [exc], 0
    while pending and seen < 64:
        err, seen = pending.pop(0), seen + 1
        if isinstance(err, ShardFormatError | DataError):
            return err
        pending += [e for e in (getattr(err, "cause", None), err.__cause__) if e is not None]
    return None


def _root_error(exc: BaseException) -> str:
    """The first line of the worker's own error, for a one-line CLI message.

    Ray reports worker failures as `worker_failures` (rank -> exception); a task error wraps
    the original exception as `.cause`. The first TodiError found (bad data, student, ...) is
    the message; anything else is reported by the last line of Ray's text.
    """
    pending: list[BaseException] = [exc, *getattr(exc, "worker_failures", {}).values()]
    seen: list[BaseException] = []
    while pending:
        err = pending.pop(0)
        if any(err is e for e in seen):
            continue
        seen.append(err)
        if isinstance(err, TodiError) and not hasattr(err, "worker_failures"):
            cause = getattr(err, "cause", None)  # a RayTaskError posing as its cause's type
            # The first line: Ray Data appends its retry advice on the lines after it.
            return first_line(cause if isinstance(cause, TodiError) else err)
        pending += [
            e
            for e in (
                getattr(err, "cause", None),
                getattr(err, "controller_failure", None),  # our callback's TrainError
                err.__cause__,
            )
            if e is not None
        ]
    # No TodiError: the innermost error that is not Ray's wrapper, by its first line (Ray's
    # last line is its retry advice, which names nothing).
    for err in reversed(seen):
        if not type(err).__module__.startswith("ray.") and str(err).strip():
            return f"{type(err).__name__}: {first_line(err)}"
    lines = [x for x in str(exc).splitlines() if x.strip()]
    return lines[0] if lines else type(exc).__name__


def prepare_run(cfg: TrainConfig):
    """All pre-flight checks (no Ray): returns (shard set, pairing, student info)."""
    shard_set = open_for_training(
        cfg.shards, verify=cfg.verify, allow_incomplete=cfg.allow_incomplete
    )
    try:
        student = describe_student(cfg.student)
    except (StudentError, OSError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    pairing = check_pairing(shard_set.signature, student, cfg.temperature)
    if shard_set.signature.targets == "sampled" and not cfg.online_teacher:
        try:
            check_kind_for_weights(cfg.loss)
        except ValueError as exc:
            raise TrainError(f"--loss: {exc}") from None
        if cfg.topk_target != "tail":
            raise TrainError(
                "--topk-target renormalized: a sampled shard set has no top-k to renormalize "
                "(its draws estimate the full-vocabulary divergence)"
            )
    if cfg.online_teacher:
        teacher = describe_student(cfg.online_teacher)
        meta = shard_set.signature
        if (
            teacher.tokenizer_sha256 != meta.tokenizer_sha256
            or teacher.vocab_size != meta.vocab_size
        ):
            raise DataError(
                f"online teacher {cfg.online_teacher}: tokenizer {teacher.tokenizer_sha256[:16]}… "
                f"/ vocab {teacher.vocab_size} != shard set's {meta.tokenizer_sha256[:16]}… / "
                f"{meta.vocab_size}"
            )
    if cfg.max_tokens is not None and cfg.max_steps is None:
        raise TrainError(
            "--max-tokens needs --max-steps: with a token budget the number of micro-batches "
            "per epoch depends on the lengths, so the schedule length must be given"
        )
    return shard_set, pairing, student


def train(cfg: TrainConfig, *, teacher_engine: TeacherFactory | None = None) -> TrainSummary:
    """Run (or resume) a training job; see the module docstring.

    `teacher_engine` starts the `--online-teacher` (e.g. the teacher service's hf backend
    factory; `todi train` passes it): this package never imports the teacher service.
    """
    t0 = time.perf_counter()
    cfg = cfg.model_copy(update={"shards": _absolute_local(cfg.shards)})
    if cfg.eval_shards:  # workers open it too (--eval-every)
        cfg = cfg.model_copy(update={"eval_shards": _absolute_local(cfg.eval_shards)})
    if cfg.online_teacher:
        if teacher_engine is None:
            raise TrainError("online_teacher: needs a teacher engine (train(cfg, teacher_engine=))")
        cfg = cfg.model_copy(update={"online_teacher": _absolute_local(cfg.online_teacher)})
    shard_set, pairing, student = prepare_run(cfg)
    out, resumed = _prepare_out(cfg)
    student_dir = _student_dir(cfg, out)
    if shard_set.num_rows < cfg.workers:
        raise TrainError(
            f"the shard set has {shard_set.num_rows} rows, fewer than --workers {cfg.workers}"
        )
    total = _schedule_total(cfg, shard_set.num_rows)
    loop_config = {
        "config": cfg.model_dump(),
        "meta": json.loads(shard_set.signature.model_dump_json()),
        "student_dir": student_dir,
        "temperature": pairing.temperature,
        "vocab_limit": pairing.vocab_limit,
        "pad_id": student.pad_id,
        "total_steps": total,
        "queue": None,  # set by _fit, once Ray runs
        "teacher_engine": teacher_engine,
    }
    trackers = open_run_trackers(cfg, out, pairing)  # --report-to (trainer/tracking.py)
    fit = _fit(cfg, shard_set, loop_config, out, total, trackers)
    model_dir = _export_model(fit.result, out)

    plot = None
    log_path = out / LOG_NAME
    records = fit.records
    if records:
        from todi.trainer.plots import plot_log

        plot = str(plot_log(log_path, out / PLOT_NAME, title=f"{cfg.loss} · {cfg.student}"))
    metrics = fit.result.metrics or {}
    summary = TrainSummary(
        out=str(out),
        model_dir=str(model_dir),
        log=str(log_path),
        plot=plot,
        steps=int(metrics.get("step", records[-1]["step"] if records else 0)),
        first_loss=records[0]["loss"] if records else None,
        last_loss=records[-1]["loss"] if records else None,
        stopped_early=bool(metrics.get("stopped_early", False)),
        resumed=resumed,
        seconds=time.perf_counter() - t0,
        temperature=pairing.temperature,
        vocab_limit=pairing.vocab_limit,
        jemalloc=fit.jemalloc,
        startup_s=fit.startup_s,
    )
    summary.eval = finish_run(cfg, summary, trackers)  # --eval-shards, then close trackers
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1))
    return summary


def _prepare_out(cfg: TrainConfig) -> tuple[Path, bool]:
    """(absolute out folder, resumed): refuses an existing run without --resume, or a resume
    with another trajectory; records the configuration; a fresh run starts a fresh log."""
    out = cfg.out_dir.absolute()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "ray" / RUN_NAME
    config_path = out / CONFIG_NAME
    resumed = False
    if run_dir.exists():
        if not cfg.resume:
            raise TrainError(
                f"{out} already holds a training run ({run_dir}); pass --resume to continue "
                "it, or choose another --out"
            )
        if config_path.is_file():
            diffs = trajectory_differences(json.loads(config_path.read_text()), cfg)
            if diffs:
                raise TrainError(f"--resume with a different configuration: {'; '.join(diffs)}")
        resumed = True
    config_path.write_text(json.dumps(cfg.model_dump(), indent=1))
    if not resumed:
        log = out / LOG_NAME
        if log.exists():
            log.unlink()
    return out, resumed


def _student_dir(cfg: TrainConfig, out: Path) -> str:
    """The HF folder the workers load: the student's own, or an `init:` student built once
    from the teacher's weights / the config into `out/student_init`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run's own bar is the one to watch
    spec = parse_student_spec(cfg.student)
    if spec.kind == "folder":
        return str(spec.path.absolute())
    init_dir = out / "student_init"
    if not (init_dir / "config.json").is_file():
        model, tokenizer = build_student(spec, seed=cfg.seed)
        tmp = out / "student_init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_student(model, tokenizer, tmp)
        os.replace(tmp, init_dir)
        del model
    return str(init_dir)


def _worker_env(cfg: TrainConfig) -> tuple[dict[str, str], str | None]:
    """(the workers' environment variables, the jemalloc preloaded or None)."""
    jemalloc = jemalloc_path() if cfg.jemalloc else None
    if cfg.jemalloc and jemalloc is None:
        raise TrainError("--jemalloc: this ray wheel has no ray/core/libjemalloc.so")
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if jemalloc:
        env["LD_PRELOAD"] = jemalloc
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return env, jemalloc


@dataclass
class _FitResult:
    result: Any  # ray.train.Result
    records: list[dict]  # rank 0's per-step records, the whole log (a resume's included)
    startup_s: float | None
    jemalloc: str | None


def _fit(
    cfg: TrainConfig, shard_set, loop_config: dict[str, Any], out: Path, total: int, trackers
) -> _FitResult:
    """Start or join Ray, run the TorchTrainer to the end, drain the metrics (into the log
    and `trackers`); Ray is shut down again if this call started it."""
    import ray
    from ray.util.queue import Queue

    started = _connect_ray(cfg)
    sink = None
    try:
        use_gpu = _use_gpu(cfg)
        env, jemalloc = _worker_env(cfg)

        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        from todi.trainer.data import build_dataset

        dataset = build_dataset(shard_set, seed=cfg.seed)
        queue = Queue(actor_options={"num_cpus": 0})
        sink = _MetricsSink(queue, out / LOG_NAME, cfg.max_steps or total, cfg.progress, trackers)
        trainer = _trainer(cfg, {**loop_config, "queue": queue}, dataset, out, env, use_gpu=use_gpu)
        t_fit = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as exc:
            raise TrainError(f"training failed: {_root_error(exc)}") from exc
        sink.close()
        records = sink.records
        startup = None
        if sink.first_at is not None and sink.first_record is not None:
            # fit() -> the first step begins: controller, workers, process group, model load
            startup = max(0.0, sink.first_at - t_fit - sink.first_record["step_s"])
        sink = None
        with contextlib.suppress(Exception):
            ray.kill(queue.actor)
    finally:
        if sink is not None:
            sink.close()
            trackers.close()  # the run failed: end the trackers' runs too
        if started:
            ray.shutdown()
    return _FitResult(result, records, startup, jemalloc)


def _trainer(
    cfg: TrainConfig,
    loop_config: dict[str, Any],
    dataset,
    out: Path,
    env: dict[str, str],
    *,
    use_gpu: bool,
):
    """The TorchTrainer of the run: `cfg.workers` workers over `dataset`, storage in out/ray."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    with warnings.catch_warnings():  # Ray's own defaults trip its deprecation warning
        warnings.simplefilter("ignore")
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # deterministic split: resume replays the data order
    return TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            callbacks=[_data_errors_are_final()],
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )


def _export_model(result: Any, out: Path) -> Path:
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
