"""Student training on a shard set with Ray Train (`TorchTrainer`): the entry point, `train`.

The objective of one optimizer step (docs/method.md, "The objective"):

    loss = ((1 - w) * sum_n CE_n + w * sum_n D(p_n || q_n)) / N_global

summed over the response positions n of every micro-batch of the step on every worker, with
N_global their number (all-reduced across workers, summed over accumulation micro-batches):
the mean over the response tokens of the GLOBAL batch. CE is at T = 1 on the next token; D
is the sparse divergence (k teacher ids + tail bucket) at the shard set's temperature T.

Where each part lives:

- `todi.trainer.objective`   the global-mean loss and its denominator;
- `todi.trainer.step`        `StudentObjective` (chunked head loss), optimizer, schedule, one step;
- `todi.trainer.strategy`    how workers share the work: collectives, the DDP wrapping;
- `todi.trainer.checkpoint`  what a checkpoint holds, restore, the final export;
- `todi.trainer.worker`      the loop every Ray Train worker runs;
- `todi.trainer.metrics`     the driver's sink of rank 0's per-step records;
- `todi.trainer.launch`      Ray: connect, the TorchTrainer, worker errors;
- this module                the driver (`train`): pre-flight checks, the output folder, the
                             `init:` student materialized once, the run, the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from todi.storage.fs import is_uri
from todi.trainer.checkpoint import STATE_FILE, export_model, write_checkpoint
from todi.trainer.config import TrainConfig, trajectory_differences
from todi.trainer.data import (
    DataError,
    check_pairing,
    micro_batches_per_epoch,
    open_for_training,
)
from todi.trainer.divergences import check_kind_for_weights
from todi.trainer.errors import TrainError
from todi.trainer.launch import RUN_NAME, jemalloc_path, run_fit
from todi.trainer.metrics import LOG_NAME
from todi.trainer.online import TeacherFactory
from todi.trainer.step import (
    StepStats,
    StudentObjective,
    batch_sums,
    lr_factor,
    make_optimizer,
    make_scheduler,
    train_step,
)
from todi.trainer.student import (
    StudentError,
    build_student,
    describe_student,
    parse_student_spec,
    save_student,
)
from todi.trainer.tracking import finish_run, open_run_trackers
from todi.trainer.worker import FAULT_ENV

# Names other modules, tests and benchmarks import from here (the module before the split).
__all__ = [
    "FAULT_ENV",
    "LOG_NAME",
    "STATE_FILE",
    "StepStats",
    "StudentObjective",
    "TrainError",
    "TrainSummary",
    "batch_sums",
    "jemalloc_path",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "prepare_run",
    "train",
    "train_step",
    "write_checkpoint",
]

PLOT_NAME = "curves.png"
CONFIG_NAME = "train_config.json"


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


def _absolute_local(location: str) -> str:
    return location if is_uri(location) else str(Path(location).absolute())


def _schedule_total(cfg: TrainConfig, rows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_worker = rows // cfg.workers
    micro = micro_batches_per_epoch(per_worker, cfg.batch_size)
    return max(1, cfg.epochs * -(-micro // cfg.grad_accum))


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
                f"--topk-target {cfg.topk_target}: a sampled shard set has no top-k to "
                "renormalize or spread around (its draws estimate the full-vocabulary "
                "divergence; --sampled-estimator chooses how)"
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
    fit = run_fit(cfg, shard_set, loop_config, out, total, trackers)
    model_dir = export_model(fit.result, out)

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
