"""The worker loop: what every Ray Train worker runs (`worker_loop`).

Data (see `todi.trainer.data`), AdamW (weight decay on matrices only), cosine schedule with
optional linear warm-up, grad-norm clipping, bf16 autocast, Ray Train checkpoints every N
steps holding model, optimizer, scheduler, data position and RNG states
(`todi.trainer.checkpoint`). A restart (worker failure, `--resume`) loads the last checkpoint
and skips the data stream to the saved position: the continued run computes what the
uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from todi.storage import Batch, ShardSetMetadata
from todi.trainer.checkpoint import (
    load_start,
    report_checkpoint,
    restore_training_state,
    rng_state,
    set_rng_state,
    write_checkpoint,
    write_sharded_checkpoint,
)
from todi.trainer.config import TrainConfig
from todi.trainer.data import (
    LoaderSettings,
    decode_rows,
    dummy_batch,
    epoch_batches,
    raw_rows,
)
from todi.trainer.errors import TrainError
from todi.trainer.step import (
    StepStats,
    StudentObjective,
    make_optimizer,
    make_scheduler,
    train_step,
)
from todi.trainer.strategy import (
    all_reduce,
    gather_objects,
    is_fsdp,
    use_bf16,
    wants_fsdp,
    wrap_objective,
)

FAULT_ENV = "TODI_TRAIN_FAULT"
"""Fault injection for tests: `kill:STEP:RANK:MARKER` makes worker RANK SIGKILL itself right
after optimizer step STEP, once (MARKER, a file path, records that it happened)."""


def _maybe_fault(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, at_step, at_rank, marker = spec.split(":", 3)
    if kind != "kill" or int(at_step) != step or int(at_rank) != rank or os.path.exists(marker):
        return
    Path(marker).write_text(f"killed rank {rank} after step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _row_stream(data_iter, schema_box: list):
    """Raw rows of this worker's split, block by block; the blocks' schema goes in the box."""
    for table in data_iter.iter_batches(
        batch_size=None, batch_format="pyarrow", prefetch_batches=2
    ):
        schema, rows = raw_rows(table)
        schema_box[:] = [schema]
        yield from rows


def worker_loop(lc: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: `lc` is the driver's `train_loop_config`."""
    _Worker(lc).run()


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

        checkpoint = ray.train.get_checkpoint()
        opened = checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext()
        with opened as d:
            d = None if d is None else Path(d)
            self.model, self.tokenizer, state = load_start(d, lc, cfg, self.world)
            self.model.to(self.device)
            self.model.train()
            self.objective = wrap_objective(
                StudentObjective(
                    self.model,
                    kind=cfg.loss,
                    beta=cfg.beta,
                    temperature=lc["temperature"],
                    chunk_size=cfg.chunk_size,
                    vocab_limit=lc["vocab_limit"],
                    # FSDP casts the parameters itself (mixed-precision policy), no autocast
                    bf16=use_bf16(cfg, self.device) and not wants_fsdp(cfg),
                    kd_weight=cfg.kd_weight,
                    tail=cfg.topk_target != "renormalized",
                    spread=cfg.topk_target == "spread",
                    sampled=cfg.sampled_estimator,
                ),
                cfg,
                self.device,
                self.world,
            )
            self.sharded = is_fsdp(self.objective)  # checkpoints: every worker writes its part
            self.optimizer = make_optimizer(self.model, cfg)
            self.scheduler = make_scheduler(
                self.optimizer, warmup=cfg.warmup_steps, total=lc["total_steps"]
            )
            self.step, self.epoch, self.position = 0, 0, 0
            if state is not None and d is not None:
                restore_training_state(d, state, self.objective, self.optimizer, self.scheduler)
                self.step, self.epoch = state["step"], state["epoch"]
                self.position = state["positions"][self.rank]
                set_rng_state(state["rng"][self.rank])
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
        self._report(final, save=self.last_saved != self.step, final=True)
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
        if self.device.type == "cuda":  # this worker's peak since it started (bench/gpu_check.sh)
            record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
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

    def _report(self, metrics: dict[str, Any], save: bool, final: bool = False) -> None:
        """Report `metrics` to Ray Train, with a checkpoint if `save`: written by rank 0
        (DDP), or by every worker, each its shards (FSDP; with the gathered HF folder when
        `final`, the run's last checkpoint)."""
        import ray.train

        positions = gather_objects(self.position)
        rngs = gather_objects(rng_state())
        ckpt_state = {
            "step": self.step,
            "epoch": self.epoch,
            "positions": positions,
            "rng": rngs,
            "world_size": self.world,
            "strategy": "fsdp" if self.sharded else "ddp",
            "config": self.lc["config"],
        }
        name = f"step-{self.step:08d}"
        if save and self.sharded:

            def write_shards(d: Path) -> None:
                write_sharded_checkpoint(
                    d,
                    self.model,
                    self.tokenizer,
                    self.objective,
                    self.optimizer,
                    self.scheduler,
                    ckpt_state,
                    rank=self.rank,
                    full_weights=final,
                )

            report_checkpoint(self.ctx, metrics, name, write_shards, all_ranks=True)
        elif save and self.rank == 0:

            def write(d: Path) -> None:
                write_checkpoint(
                    d, self.model, self.tokenizer, self.optimizer, self.scheduler, ckpt_state
                )

            report_checkpoint(self.ctx, metrics, name, write)
        else:
            ray.train.report(metrics, checkpoint=None)
        if save:
            self.last_saved = self.step
