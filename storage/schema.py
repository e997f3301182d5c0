"""Shard format v1: the one contract between the teacher and the trainer.

A shard set is a directory holding Parquet files and `manifest.json`. One row per sequence:

    sample_id       string        stable id (dataset id, else sha256 of the token ids)
    input_ids       list<int32>   the whole token sequence, length L
    prompt_len      int32         tokens before the response (0 for plain text)
    ...             binary        the codec's columns: the top-k ids [P, k] and log-probs
                                  [P, k], encoded (see `todi.storage.codec`; the codec name is in
                                  the metadata)

where the P = L - 1 - first_position stored positions are t = first_position .. L - 2,
first_position = max(prompt_len - 1, 0), and row t of the top-k predicts token t + 1. The
log-probs are normalized over the FULL vocabulary at the recorded temperature, never
renormalized over the top-k: the tail mass 1 - sum(p_k) is information the losses use.

Every file footer (key `todi`) and the manifest carry the same `ShardSetMetadata`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from todi.common.errors import TodiError
from todi.storage.codec import DEFAULT_CODEC

FORMAT_VERSION = 1
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
    top_k: int = Field(gt=0)
    temperature: float = Field(gt=0)
    logprobs_mode: str
    backend: str
    codec: str = DEFAULT_CODEC

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


def shard_schema(codec_name: str) -> pa.Schema:
    """The physical Parquet schema of shards written with `codec_name`."""
    from todi.storage.codec import get_codec

    return pa.schema([*BASE_FIELDS, *get_codec(codec_name).columns])


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
