"""`TrainConfig`: every knob of `todi train`, from a YAML/TOML file and/or command-line flags.

Precedence: built-in defaults < the config file < flags given on the command line. Keys in a
file use the field names below (`kd_weight` or `kd-weight`); an unknown key is an error that
names it, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from todi.common.errors import TodiError
from todi.common.validation import field_name, validation_errors
from todi.trainer.divergences import KINDS


class ConfigError(TodiError, ValueError):
    """A configuration that cannot be used; the message names the field and the problem."""


class TrainConfig(BaseModel):
    """Student training on a shard set (see `todi.trainer.train.train`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- what ------------------------------------------------------------------------------
    shards: str = Field(description="shard set: local folder or pyarrow.fs URI (s3://...)")
    student: str = Field(
        description="HF folder | init:teacher=DIR,layers=N | init:config=FILE[,tokenizer=DIR]"
    )
    out: str = Field(description="output folder: model/, train_log.jsonl, curves.png, ray/")

    # -- objective: (1 - kd_weight) * CE + kd_weight * divergence, mean over response tokens
    loss: str = "todi"
    beta: float = Field(1.0, gt=0)
    kd_weight: float = Field(0.5, ge=0, le=1)
    temperature: float | None = Field(
        None, gt=0, description="must equal the shard set's temperature; None = take it"
    )
    chunk_size: int = Field(1024, ge=1, description="positions per head-loss chunk")
    topk_target: Literal["tail", "spread", "renormalized"] = Field(
        "tail",
        description="tail: the k stored ids + one tail bucket (exact coarsening); spread: the "
        "teacher's rest of the mass spread evenly over the unlisted ids, the divergence over "
        "the whole vocabulary; renormalized: the k ids only, both sides renormalized (what "
        "most tools do; an ablation)",
    )
    sampled_estimator: Literal["bucketed", "unbiased"] = Field(
        "bucketed",
        description="sampled shard sets only. bucketed: the teacher-mass side by importance "
        "weights, the student-mass side over the listed ids + one bucket for the rest (the "
        "targets study: far ahead of unbiased); unbiased: both sides by importance weights "
        "(docs/method.md)",
    )

    # -- optimisation ----------------------------------------------------------------------
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch, per worker")
    max_tokens: int | None = Field(
        None, ge=2, description="cap on padded tokens per micro-batch (with batch_size)"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = no clipping")
    bf16: bool | None = Field(None, description="bf16 autocast; None = where supported (GPU)")
    seed: int = 0
    gradient_checkpointing: bool = Field(
        False,
        description="activation checkpointing of the decoder layers: recompute each layer's "
        "activations in backward instead of keeping them (less memory, one more forward)",
    )

    # -- data -------------------------------------------------------------------------------
    shuffle_buffer: int = Field(1024, ge=0, description="samples in the shuffle buffer")
    bucket_buffer: int = Field(
        256, ge=0, description="samples sorted by length together (0 = no bucketing)"
    )
    verify: bool = Field(True, description="check every shard's checksum before training")
    allow_incomplete: bool = Field(False, description="train on a set still marked incomplete")

    # -- cluster ---------------------------------------------------------------------------
    workers: int = Field(2, ge=1)
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole student; fsdp: parameters, gradients "
        "and optimizer state sharded over the workers (torch FSDP2, trainer/strategy.py)",
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement of the training workers: PACK fills one node first; "
        "SPREAD puts them on different nodes where it can (STRICT_*: must)",
    )
    use_gpu: bool | None = Field(None, description="None = GPU workers iff the cluster has GPUs")
    ray_address: str | None = Field(None, description="auto | ray://host:port; None = local")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from a checkpoint")
    jemalloc: bool = Field(
        False, description="LD_PRELOAD ray's bundled jemalloc in workers (measured: no gain)"
    )

    # -- checkpoints -----------------------------------------------------------------------
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = end only")
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = False
    stop_at_step: int | None = Field(
        None, ge=1, description="stop (with a checkpoint) after this step, as if interrupted"
    )

    # -- online teacher (comparison only) --------------------------------------------------
    online_teacher: str | None = Field(None, description="HF teacher folder computing targets")
    online_quantize: bool = Field(
        False, description="pass online targets through the shard codec (bit-equal to shards)"
    )
    online_full_vocab: bool = Field(
        False,
        description="online teacher over the full vocabulary (k = V, no tail) instead of the "
        "shard set's top-k: full-vocabulary distillation, the reference for offline top-k",
    )

    # -- trackers and the final evaluation (trainer/tracking.py) ---------------------------
    report_to: list[str] = Field(
        default_factory=list,
        description="experiment trackers: tensorboard, mlflow, wandb (all | none); offline",
    )
    eval_shards: str | None = Field(
        None, description="held-out shard set: evaluate the exported model on it at the end"
    )
    eval_max_samples: int | None = Field(None, ge=1, description="evaluate only the first N")
    eval_every: int = Field(
        0, ge=0, description="also evaluate on eval_shards every N steps (0 = at the end only)"
    )

    progress: bool = True

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v: Any) -> list[str]:
        from todi.trainer.tracking import parse_report_to

        return parse_report_to(v)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in KINDS:
            raise ValueError(f"unknown loss {v!r}; expected one of {', '.join(KINDS)}")
        return v

    @field_validator("beta", "kd_weight", "lr", "weight_decay", "grad_clip", "temperature")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.bucket_buffer and self.bucket_buffer < self.batch_size:
            raise ValueError(
                f"bucket_buffer ({self.bucket_buffer}) must be 0 or >= batch_size "
                f"({self.batch_size})"
            )
        if self.online_full_vocab and not self.online_teacher:
            raise ValueError("online_full_vocab needs online_teacher")
        if self.online_full_vocab and self.online_quantize:
            raise ValueError("online_full_vocab and online_quantize exclude each other")
        if self.eval_every and not self.eval_shards:
            raise ValueError("eval_every needs eval_shards")
        if self.eval_every and self.strategy == "fsdp":
            # Rank 0 evaluates alone while the others wait; a sharded model needs them all.
            raise ValueError(
                "eval_every needs strategy ddp (an FSDP model is sharded over the workers); "
                "with fsdp, --eval-shards evaluates the exported model at the end"
            )
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})"
            )
        return self

    @property
    def effective_bucket_buffer(self) -> int:
        """Bucket size rounded down to a multiple of batch_size (whole batches per bucket).

        With a fixed batch size, every bucket then cuts into full micro-batches except the
        epoch's last, so a worker's number of micro-batches is ceil(rows / batch_size)."""
        if self.bucket_buffer <= 0:
            return 0
        return max(self.batch_size, self.bucket_buffer // self.batch_size * self.batch_size)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


# Fields that change the training trajectory: `--resume` refuses a config that differs in any
# of them from the run it continues (the rest — cluster address, failures, progress bar,
# stop_at_step, checkpoint cadence — may change between the two invocations).
TRAJECTORY_FIELDS = (
    "shards",
    "student",
    "loss",
    "beta",
    "kd_weight",
    "chunk_size",
    "epochs",
    "max_steps",
    "batch_size",
    "max_tokens",
    "grad_accum",
    "lr",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "bf16",
    "seed",
    "shuffle_buffer",
    "bucket_buffer",
    "workers",
    "strategy",
    "online_teacher",
    "online_quantize",
)


def _normalize_keys(data: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
        out[key.replace("-", "_")] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Key/values from a .yaml/.yml/.toml file. A `[train]` table (TOML) or `train:` mapping
    (YAML) is used when present, so one file can hold several commands' settings."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(p.read_text())
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(p.read_text()) or {}
        else:
            raise ConfigError(f"config file {p}: unknown type {suffix!r} (use .yaml, .yml, .toml)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {p}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level")
    if isinstance(data.get("train"), dict):
        data = data["train"]
    return _normalize_keys(data, str(p))


def _first_error(exc: ValidationError, source: str) -> ConfigError:
    errors = validation_errors(exc)
    first = errors[0]
    field = field_name(first["loc"], "config")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown setting"
    elif first["type"] == "missing":
        msg, shown = "required (give it as a flag or in the config file)", ""
    return ConfigError(f"{source}: {field}: {msg}{shown}{more}")


def load_config(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults < `config_file` < `overrides` (None values in overrides mean 'not given')."""
    data: dict[str, Any] = {}
    if config_file is not None:
        data.update(read_config_file(config_file))
    given = {k: v for k, v in _normalize_keys(overrides or {}, "flags").items() if v is not None}
    data.update(given)
    source = f"config ({config_file})" if config_file else "config"
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, source) from None


def trajectory_differences(saved: dict[str, Any], now: TrainConfig) -> list[str]:
    """`field: saved != now` for each trajectory field that differs (for `--resume`)."""
    current = now.model_dump()

    def default(name: str) -> Any:  # a field newer than the saved run: its default then
        return TrainConfig.model_fields[name].default

    return [
        f"{name}: {saved.get(name, default(name))!r} (checkpointed run) != {current[name]!r} (now)"
        for name in TRAJECTORY_FIELDS
        if saved.get(name, default(name)) != current[name]
    ]
