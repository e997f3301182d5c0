"""The Ray launch: join or start Ray, build the `TorchTrainer` over the workers
(`todi.trainer.worker.worker_loop`), run it, drain rank 0's metrics (`MetricsSink`), and turn
worker failures into one-line messages.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from todi.common.errors import TodiError, first_line
from todi.trainer.config import TrainConfig
from todi.trainer.data import DataError
from todi.trainer.errors import TrainError
from todi.trainer.metrics import LOG_NAME, MetricsSink
from todi.trainer.worker import FAULT_ENV, worker_loop

RUN_NAME = "train"


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


def connect_ray(cfg: TrainConfig) -> bool:
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


def wants_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= cfg.workers


def data_errors_are_final():
    """A Ray Train callback that ends the run at a worker's data error (a corrupt or missing
    shard): retrying from a checkpoint would read the same bytes again. Raising in the
    controller's hook stops it without the `max_failures` worker-group restarts; the driver
    then reports the worker's own message (`root_error`)."""
    from ray.train import UserCallback

    class DataErrorsAreFinal(UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            for exc in worker_exceptions.values():
                if _data_error(exc) is not None:
                    raise TrainError(root_error(exc))

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


def root_error(exc: BaseException) -> str:
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


def worker_env(cfg: TrainConfig) -> tuple[dict[str, str], str | None]:
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
class FitResult:
    result: Any  # ray.train.Result
    records: list[dict]  # rank 0's per-step records, the whole log (a resume's included)
    startup_s: float | None
    jemalloc: str | None


def run_fit(
    cfg: TrainConfig, shard_set, loop_config: dict[str, Any], out: Path, total: int, trackers
) -> FitResult:
    """Start or join Ray, run the TorchTrainer to the end, drain the metrics (into the log
    and `trackers`); Ray is shut down again if this call started it."""
    import ray
    from ray.util.queue import Queue

    started = connect_ray(cfg)
    sink = None
    try:
        use_gpu = wants_gpu(cfg)
        env, jemalloc = worker_env(cfg)

        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        from todi.trainer.data import build_dataset

        dataset = build_dataset(shard_set, seed=cfg.seed)
        queue = Queue(actor_options={"num_cpus": 0})
        sink = MetricsSink(queue, out / LOG_NAME, cfg.max_steps or total, cfg.progress, trackers)
        trainer = make_trainer(
            cfg, {**loop_config, "queue": queue}, dataset, out, env, use_gpu=use_gpu
        )
        t_fit = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as exc:
            raise TrainError(f"training failed: {root_error(exc)}") from exc
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
    return FitResult(result, records, startup, jemalloc)


def make_trainer(
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
        worker_loop,
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
            callbacks=[data_errors_are_final()],
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )
