"""Shard format v2: the one contract between the teacher and the trainer.

A shard set is a directory holding Parquet files and `manifest.json`. One row per sequence:

    sample_id       string        stable id (dataset id, else sha256 of the token ids)
    input_ids       list<int32>   the whole token sequence, length L
    prompt_len      int32         tokens before the response (0 for plain text)
    ...             binary        the codec's columns: the top-k ids [P, k] and log-probs
                                  [P, k], encoded (see `todi.storage.codec`; the codec name is in
                                  the metadata); absent when k = 0 (draws only)
    draws           binary        `targets = "sampled"` only: N teacher draws per position as
                                  unique ids, counts and log-probs (`todi.storage.draws`)
    tail_logz       binary        only with `retemper_temperatures`: per position and
                                  temperature, the log-partition of the ids NOT stored, which
                                  re-tempers the row exactly (`todi.storage.draws`)

where the P = L - 1 - first_position stored positions are t = first_position .. L - 2,
first_position = max(prompt_len - 1, 0), and row t of the top-k predicts token t + 1. The
log-probs are normalized over the FULL vocabulary at the recorded temperature, never
renormalized over the top-k: the tail mass 1 - sum(p_k) is information the losses use.

Target kinds (`targets`): "topk" (k ids + the tail bucket 1 - sum p_k) or "sampled" (N draws
with replacement from the teacher at every position; with k > 0 the draws come from the mass
outside the exact top-k: a hybrid). Format 1 sets (top-k only) stay readable.

Every file footer (key `todi`) and the manifest carry the same `ShardSetMetadata`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from todi.common.errors import TodiError
from todi.storage.codec import DEFAULT_CODEC
from todi.storage.draws import MAX_DRAWS, Draws

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
FOOTER_KEY = b"todi"
SHARD_SUFFIX = ".parquet"

BASE_FIELDS = (
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("prompt_len", pa.int32(), nullable=False),
)
# The logical row (and the physical schema of the legacy codec qdelta32-planes-v1).
ARROW_SCHEMA = pa.schema(
    [
        *BASE_FIELDS,
        pa.field("topk_ids", pa.binary(), nullable=False),
        pa.field("topk_logprobs", pa.binary(), nullable=False),
    ]
)

# The fields two writers must agree on before they may add to the same set.
SIGNATURE_FIELDS = (
    "format_version",
    "teacher_fingerprint",
    "tokenizer_sha256",
    "vocab_size",
    "top_k",
    "temperature",
    "logprobs_mode",
    "codec",
    "targets",
    "draws",
    "sample_seed",
    "candidates",
    "retemper_temperatures",
)


class ShardFormatError(TodiError, ValueError):
    """A shard set that cannot be read or written as asked; the message names file and problem."""


class NoManifestError(ShardFormatError):
    """The folder holds no manifest: not a shard set, or nothing committed yet."""


class ShardSetMetadata(BaseModel):
    """Recorded in every Parquet footer and in the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    teacher_model: str
    teacher_fingerprint: str
    tokenizer_sha256: str
    vocab_size: int = Field(gt=0)
    top_k: int = Field(ge=0)  # exact top-k entries per position (0: draws only)
    temperature: float = Field(gt=0)
    logprobs_mode: str
    backend: str
    codec: str = DEFAULT_CODEC
    targets: Literal["topk", "sampled"] = "topk"
    draws: int = Field(0, ge=0, le=MAX_DRAWS)  # N per position ("sampled")
    sample_seed: int | None = None  # the draws' seed ("sampled")
    # Size of the candidate set the draws came from (the engine's top-C at each position);
    # None: the full vocabulary.
    candidates: int | None = None
    # Temperatures this set can be re-tempered to exactly (the `tail_logz` column).
    retemper_temperatures: tuple[float, ...] = ()

    @model_validator(mode="after")
    def _targets_consistent(self) -> ShardSetMetadata:
        if self.targets == "topk" and (self.top_k < 1 or self.draws):
            raise ValueError("a top-k set needs top_k >= 1 and no draws")
        if self.targets == "sampled" and (self.draws < 1 or self.sample_seed is None):
            raise ValueError("a sampled set needs draws >= 1 and a sample_seed")
        if any(not t > 0 for t in self.retemper_temperatures):
            raise ValueError("retemper_temperatures must be > 0")
        return self

    @property
    def listed_per_position(self) -> str:
        """What a position stores, for messages: 'top-64 + tail', '50 draws', ..."""
        if self.targets == "topk":
            return f"top-{self.top_k} + tail"
        head = f"top-{self.top_k} + " if self.top_k else ""
        return f"{head}{self.draws} draws"

    def signature_differences(self, other: ShardSetMetadata) -> list[str]:
        """`field: ours != theirs` for each signature field that differs."""
        return [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in SIGNATURE_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]

    def footer(self) -> dict[bytes, bytes]:
        return {FOOTER_KEY: self.model_dump_json().encode()}

    @classmethod
    def from_footer(cls, meta: dict[bytes, bytes] | None, where: str) -> ShardSetMetadata:
        if not meta or FOOTER_KEY not in meta:
            raise ShardFormatError(f"{where}: no todi metadata in the Parquet footer")
        try:
            return cls.model_validate_json(meta[FOOTER_KEY])
        except ValueError as exc:
            raise ShardFormatError(f"{where}: bad footer metadata: {exc}") from None


@dataclass
class TopK:
    """Top-k teacher predictions for one sequence of length L: what a teacher engine returns and
    the rows a `Sample` stores (those from its first stored position on)."""

    ids: np.ndarray  # int32 [L-1, k], ranks 1..k by descending log-prob; row t predicts t+1
    logprobs: np.ndarray  # float32 [L-1, k], normalized over the full vocabulary at T


@dataclass
class Sample:
    """One sequence with its teacher top-k for every stored position."""

    sample_id: str
    input_ids: np.ndarray  # int32 [L]
    prompt_len: int
    topk_ids: np.ndarray  # int32 [P, k], descending log-prob order
    topk_logprobs: np.ndarray  # float32 [P, k]
    draws: Draws | None = None  # sampled sets: the teacher's draws at the P positions
    tail_logz: np.ndarray | None = None  # float32 [P, G]: see `todi.storage.draws`

    @property
    def first_position(self) -> int:
        return first_position(self.prompt_len)

    @property
    def num_positions(self) -> int:
        return int(self.topk_ids.shape[0])


def first_position(prompt_len: int) -> int:
    """The first stored position: the one whose next token is the first response token."""
    return max(prompt_len - 1, 0)


def expected_positions(seq_len: int, prompt_len: int) -> int:
    return max(seq_len - 1 - first_position(prompt_len), 0)


def content_sample_id(input_ids: np.ndarray | list[int]) -> str:
    """A stable id for rows without one: sha256 of the int32 little-endian token ids."""
    blob = np.asarray(input_ids, dtype="<i4").tobytes()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:32]


def shard_schema(of: str | ShardSetMetadata) -> pa.Schema:
    """The physical Parquet schema of shards of a set with metadata `of` (or, given a codec
    name, of a plain top-k set written with that codec)."""
    from todi.storage.codec import get_codec

    if isinstance(of, str):
        return pa.schema([*BASE_FIELDS, *get_codec(of).columns])
    fields = [*BASE_FIELDS, *(get_codec(of.codec).columns if of.top_k else ())]
    if of.targets == "sampled":
        fields.append(DRAWS_FIELD)
    if of.retemper_temperatures:
        fields.append(TAIL_FIELD)
    return pa.schema(fields)


DRAWS_FIELD = pa.field("draws", pa.binary(), nullable=False)
TAIL_FIELD = pa.field("tail_logz", pa.binary(), nullable=False)


def metadata_json(metadata: ShardSetMetadata) -> dict:
    return json.loads(metadata.model_dump_json())


def check_sample(
    sample: Sample, metadata: ShardSetMetadata, where: str, *, topk_values: bool = True
) -> None:
    """Raise ShardFormatError unless `sample` is a well-formed row of a set with `metadata`.

    `topk_values=False` skips the top-k range checks (for decoders that cannot produce ids
    outside the vocabulary or positive / non-finite log-probs).
    """
    name = f"{where}: sample {sample.sample_id!r}"
    ids, lps = sample.topk_ids, sample.topk_logprobs
    seq_len = int(sample.input_ids.shape[0])
    if sample.input_ids.ndim != 1 or seq_len < 2:
        raise ShardFormatError(f"{name}: input_ids must be a 1-D sequence of >= 2 tokens")
    if not 0 <= sample.prompt_len < seq_len:
        raise ShardFormatError(f"{name}: prompt_len {sample.prompt_len} not in [0, {seq_len})")
    positions = expected_positions(seq_len, sample.prompt_len)
    want = (positions, metadata.top_k)
    if ids.shape != want or lps.shape != want:
        raise ShardFormatError(
            f"{name}: top-k arrays have shapes {ids.shape} and {lps.shape}, expected {want} "
            f"(k={metadata.top_k}, {positions} positions)"
        )
    vocab = metadata.vocab_size
    if sample.input_ids.min() < 0 or sample.input_ids.max() >= vocab:
        bad = int(
            sample.input_ids.max() if sample.input_ids.max() >= vocab else sample.input_ids.min()
        )
        raise ShardFormatError(f"{name}: input id {bad} outside the vocabulary [0, {vocab})")
    _check_targets(sample, metadata, name, positions)
    if not topk_values:
        return
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ShardFormatError(
            f"{name}: top-k id {int(ids.max()) if ids.max() >= vocab else int(ids.min())} "
            f"outside the vocabulary [0, {vocab})"
        )
    if lps.size:
        if not np.isfinite(lps).all():
            raise ShardFormatError(f"{name}: NaN or infinite top-k log-prob")
        if lps.max() > 1e-3:
            raise ShardFormatError(
                f"{name}: positive log-prob {float(lps.max()):.4g} (log-probs must be <= 0)"
            )


def _check_targets(sample: Sample, metadata: ShardSetMetadata, name: str, positions: int) -> None:
    """The draws and re-tempering columns agree with the metadata."""
    d = sample.draws
    if (metadata.targets == "sampled") != (d is not None):
        raise ShardFormatError(
            f"{name}: {'no' if d is None else 'unexpected'} draws for a {metadata.targets!r} set"
        )
    if d is not None and d.num_positions != positions:
        raise ShardFormatError(f"{name}: draws for {d.num_positions} positions, not {positions}")
    grid = len(metadata.retemper_temperatures)
    t = sample.tail_logz
    if grid and (t is None or t.shape != (positions, grid)):
        got = None if t is None else t.shape
        raise ShardFormatError(
            f"{name}: tail_logz of shape {got}, expected {(positions, grid)} "
            f"(retemper_temperatures {metadata.retemper_temperatures})"
        )
    if not grid and t is not None:
        raise ShardFormatError(f"{name}: tail_logz in a set without retemper_temperatures")
