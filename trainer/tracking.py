"""Experiment trackers for `todi train --report-to tensorboard,mlflow,wandb`.

The convention is transformers' `report_to`: a comma-separated list of tracker names, `all`
for every one, `none` (or empty) for none. Each tracker gets the same things:

- the run's configuration (`TrainConfig`, plus the shard set's temperature and vocabulary
  limit) once, at the start;
- every optimizer step's metrics under `train/` (loss, ce, divergence, tokens, tokens_per_s,
  lr, grad_norm, padding_waste, step_s, ...), at that step. Only rank 0 reports them: its
  records reach the driver through the run's metrics queue (the same records as
  `train_log.jsonl`), and the driver alone talks to the trackers, so workers need no tracker
  package and no credentials;
- the final evaluation (`--eval-shards`: `todi eval`'s held-out metrics of the exported model)
  under `eval/`, at the last step, and the run summary (steps, seconds, first/last loss).

Everything is written offline, under `--out`:

- `tensorboard`: event files in `OUT/tensorboard/` (`tensorboard --logdir OUT/tensorboard`);
- `mlflow`: an MLflow file store in `OUT/mlruns/` unless `MLFLOW_TRACKING_URI` is set
  (`mlflow ui --backend-store-uri OUT/mlruns`);
- `wandb`: `OUT/wandb/offline-run-*`, offline unless `WANDB_MODE` is set
  (`wandb sync OUT/wandb/offline-run-*`).

The packages are imported only when their tracker is named (`pip install
"todi-distill[track]"` brings all three).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from todi.common.errors import TodiError

REPORTERS = ("tensorboard", "mlflow", "wandb")
# tracker -> (module to import, package to install)
_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
# keys of a step record that are bookkeeping, not metrics
_NOT_METRICS = ("step",)
EXPERIMENT = "todi-distill"


class TrackingError(TodiError, ValueError):
    """A tracker that cannot be used (unknown name, package missing)."""


def parse_report_to(value: str | Iterable[str] | None) -> list[str]:
    """`"tensorboard,mlflow"` / `["wandb"]` / `"all"` / `"none"` -> known names, in order."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for raw in items:
        for name in str(raw).split(","):
            name = name.strip().lower()
            if not name or name == "none":
                continue
            if name == "all":
                names.extend(n for n in REPORTERS if n not in names)
                continue
            if name not in REPORTERS:
                raise TrackingError(
                    f"unknown tracker {name!r} in report_to; expected any of "
                    f"{', '.join(REPORTERS)}, all or none"
                )
            if name not in names:
                names.append(name)
    return names


def _require(name: str):
    import importlib

    module, package = _PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackingError(
            f"--report-to {name} needs the `{package}` package: "
            f"pip install {package}  (or pip install 'todi-distill[track]')"
        ) from None


def check_available(names: Iterable[str]) -> None:
    """Import every named tracker's package now, so a missing one fails before training."""
    for name in names:
        _require(name)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b": value} with JSON-able scalars (None stays None)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def step_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A `train_log.jsonl` record -> {"train/loss": ..., ...} (numbers only)."""
    return {
        f"train/{k}": float(v)
        for k, v in record.items()
        if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    name = ""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, out: Path, run_name: str) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = out / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def log_config(self, config):
        rows = "\n".join(f"| {k} | {v} |" for k, v in flat_config(config).items())
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + rows, 0)

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self):
        self.writer.flush()
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, out: Path, run_name: str) -> None:
        _require("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # offline: a file store under --out (the file store is opt-in in MLflow 3)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").absolute().as_uri()
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def log_config(self, config):
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self):
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, out: Path, run_name: str) -> None:
        wandb = _require("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", EXPERIMENT),
            name=run_name,
            dir=str(out),
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="create_new",
        )
        self.dir = Path(self.run.dir).parent  # OUT/wandb/offline-run-...

    def log_config(self, config):
        self.run.config.update(flat_config(config), allow_val_change=True)

    def log_metrics(self, metrics, step):
        self.run.log(dict(metrics), step=int(step))
        if any(k.startswith(("eval/", "summary/")) for k in metrics):
            self.run.summary.update(dict(metrics))

    def close(self):
        self.run.finish()


_TRACKERS = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}


class Trackers:
    """Every tracker named in `report_to`, behind one object (none: every call is a no-op).

    A tracker that fails while logging is closed and dropped with a warning: a tracker never
    stops a training run."""

    def __init__(self, names: Iterable[str], out: str | Path, run_name: str) -> None:
        out = Path(out).absolute()
        self.items: list[Tracker] = []
        self.last_step = 0
        try:
            for name in parse_report_to(list(names)):
                self.items.append(_TRACKERS[name](out, run_name))
        except BaseException:
            self.close()
            raise

    def __bool__(self) -> bool:
        return bool(self.items)

    def _each(self, what: str, *args) -> None:
        for tracker in list(self.items):
            try:
                getattr(tracker, what)(*args)
            except Exception as exc:  # a tracker never stops training
                import warnings

                msg = f"{tracker.name}: {what} failed ({exc}); tracker dropped"
                warnings.warn(msg, stacklevel=2)
                self.items.remove(tracker)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._each("log_config", config)

    def log_step(self, record: Mapping[str, Any]) -> None:
        """One `train_log.jsonl` record (rank 0's step metrics)."""
        self.last_step = int(record["step"])
        self._each("log_metrics", step_metrics(record), self.last_step)

    def log_final(self, metrics: Mapping[str, Any], prefix: str, step: int | None = None) -> None:
        """Final numbers (the evaluation, the summary) as `prefix/name`, at the last step."""
        values = {
            f"{prefix}/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v
        }
        if values:
            self._each("log_metrics", values, self.last_step if step is None else step)

    def close(self) -> None:
        for tracker in self.items:
            try:
                tracker.close()
            except Exception as exc:
                import warnings

                warnings.warn(f"{tracker.name}: close failed ({exc})", stacklevel=2)
        self.items = []


# ------------------------------------------------------------------------------------------
# What `todi train` calls (three lines in trainer/train.py)

EVAL_NAME = "eval.json"


def open_run_trackers(cfg, out: Path, pairing) -> Trackers:
    """The trackers of `cfg.report_to` for the run in `out`, with its configuration logged."""
    trackers = Trackers(cfg.report_to, out, run_name=Path(out).name)
    if trackers:
        trackers.log_config(
            {
                **cfg.model_dump(),
                "shard_temperature": pairing.temperature,
                "vocab_limit": pairing.vocab_limit,
            }
        )
    return trackers


def finish_run(cfg, summary, trackers: Trackers) -> dict[str, Any] | None:
    """After the export: the final evaluation (`cfg.eval_shards`) of the exported model,
    written to `OUT/eval.json` and logged as `eval/...`; the summary as `summary/...`; then
    every tracker is closed. Returns the evaluation's metrics (None without eval_shards)."""
    metrics = None
    try:
        if cfg.eval_shards:
            from todi.trainer.evaluate import evaluate

            report = evaluate(
                cfg.eval_shards,
                {"student": summary.model_dir},
                beta=cfg.beta,
                max_samples=cfg.eval_max_samples,
            )
            metrics = report["metrics"]
            Path(summary.out, EVAL_NAME).write_text(json.dumps(report, indent=1, default=str))
            trackers.log_final(metrics, "eval", step=summary.steps)
        trackers.log_final(
            {
                "steps": summary.steps,
                "seconds": summary.seconds,
                "first_loss": summary.first_loss,
                "last_loss": summary.last_loss,
            },
            "summary",
            step=summary.steps,
        )
    finally:
        trackers.close()
    return metrics
