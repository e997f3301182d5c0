"""Job configuration: what a precompute job computes and how it runs.

`JobSpec` is the request body of `POST /v1/jobs`, the options of `todi precompute`, and what
the job records in the shard manifest (`job=`). Fields that change the CONTENT of the output
(`identity()`) must match when a job resumes into an existing set; the rest (batching, Ray,
names) may change between runs.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from todi.services.backends.base import MAX_TEMPERATURE, MIN_TEMPERATURE
from todi.services.targets import TargetKind, TargetRequest
from todi.storage.draws import MAX_DRAWS

# Paths in a job: at most this many characters, each component at most NAME_MAX bytes
# (a longer one made the OS raise ENAMETOOLONG deep inside a request).
MAX_PATH_CHARS = 1024
MAX_NAME_BYTES = 255

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Fields that determine which samples the set holds and their values.
IDENTITY_FIELDS = (
    "dataset",
    "top_k",
    "temperature",
    "max_seq_len",
    "chat_template",
    "targets",
    "draws",
    "sample_seed",
    "retemper",
)


class JobSpec(BaseModel):
    """A precompute job: score `dataset` with the teacher, write a shard set to `out`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        examples=["train.jsonl"],
        description="JSONL / Parquet file, a folder of them, or a Hugging Face datasets folder",
    )
    out: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        examples=["sets/train"],
        description="output shard-set folder; under the service, relative to its storage root",
    )
    targets: TargetKind = Field(
        "topk",
        description="'topk': the top-k + the tail bucket; 'sampled': `draws` draws with "
        "replacement from the teacher at each position (from the mass outside the top-k when "
        "top_k > 0), stored as unique ids, counts and log-probs",
    )
    top_k: int = Field(
        ge=0,
        le=4096,
        description="exact teacher log-probs kept per position (the top-k); 0 with "
        "targets 'sampled' keeps draws only",
    )
    draws: int = Field(
        0, ge=0, le=MAX_DRAWS, validate_default=True, description="draws per position (sampled)"
    )
    sample_seed: int = Field(0, ge=0, description="seed of the draws ('sampled')")
    retemper: list[float] = Field(
        default_factory=list,
        max_length=16,
        description="training temperatures this set can be re-tempered to exactly (stores "
        "the log-partition outside the kept ids per position and temperature; needs an "
        "engine with the full distribution)",
    )
    temperature: float = Field(
        1.0,
        strict=True,  # a number, never the string "0.5"
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="teacher softmax temperature",
    )
    max_seq_len: int | None = Field(
        None, ge=2, description="truncate sequences to this many tokens (prompt kept)"
    )
    batch_tokens: int = Field(
        8192, ge=2, description="token budget of one backend call (sum of sequence lengths)"
    )
    positions_per_shard: int = Field(
        65_536, ge=1, description="stored positions per shard file (the unit of resumption)"
    )
    chat_template: bool = Field(
        True, description="apply the teacher's chat template to prompt + response rows"
    )
    ray: bool = Field(False, description="run on a Ray cluster with a pool of teacher actors")
    num_actors: int = Field(2, ge=1, le=1024, description="teacher actors in --ray mode")
    job_id: str | None = Field(
        None,
        description="job id (default: generated)",
        json_schema_extra={"pattern": _JOB_ID.pattern},  # checked by _job_id (its message)
    )
    name: str | None = Field(None, max_length=200, description="free-form label")

    @field_validator("dataset", "out")
    @classmethod
    def _non_empty_path(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("must be a non-empty path")
        if "\x00" in v:
            raise ValueError("must not contain NUL bytes")
        for part in v.split("/"):
            if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                raise ValueError(
                    f"a path component is longer than {MAX_NAME_BYTES} bytes ({part[:24]!r}...)"
                )
        return v

    @field_validator("temperature")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number > 0")
        return v

    @field_validator("retemper")
    @classmethod
    def _temperatures(cls, v: list[float]) -> list[float]:
        for t in v:
            if not (math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
                raise ValueError(f"{t} is outside [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
        if len(set(v)) != len(v):
            raise ValueError("temperatures must be distinct")
        return v

    @field_validator("top_k")
    @classmethod
    def _k_for_targets(cls, v: int, info: ValidationInfo) -> int:
        if v < 1 and info.data.get("targets", "topk") == "topk":
            raise ValueError("must be >= 1 with targets 'topk' (0 only with 'sampled')")
        return v

    @field_validator("draws")
    @classmethod
    def _draws_for_targets(cls, v: int, info: ValidationInfo) -> int:
        targets = info.data.get("targets", "topk")
        if targets == "sampled" and v < 1:
            raise ValueError("must be >= 1 with targets 'sampled'")
        if targets == "topk" and v:
            raise ValueError("must be 0 with targets 'topk' (set targets to 'sampled')")
        return v

    def target_request(self) -> TargetRequest:
        """What the job keeps per position."""
        try:
            return TargetRequest(
                targets=self.targets,
                top_k=self.top_k,
                draws=self.draws,
                sample_seed=self.sample_seed,
                retemper=tuple(self.retemper),
            )
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str | None) -> str | None:
        if v is not None and not _JOB_ID.match(v):
            raise ValueError(
                "must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        return v

    def identity(self) -> dict[str, Any]:
        """The fields that define the output content (compared when resuming)."""
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}

    def identity_differences(self, recorded: dict[str, Any]) -> list[str]:
        """`field: recorded != ours` for each identity field a recorded job differs in."""
        mine = self.identity()
        return [
            f"{k}: {recorded.get(k)!r} != {mine[k]!r}"
            for k in IDENTITY_FIELDS
            if k in recorded and recorded.get(k) != mine[k]
        ]
