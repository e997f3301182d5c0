"""Writing shard sets: whole shards under unique names, then an atomic manifest update.

Crash safety: a shard becomes visible only when the manifest lists it, and the manifest is
replaced atomically after the shard file is whole on disk. A writer killed at any instant
leaves a readable set listing only whole shards, with `complete` false.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from todi.storage import fs as sfs
from todi.storage.codec import RowBlock, get_codec
from todi.storage.draws import DrawsError, encode_draws, encode_tail
from todi.storage.manifest import Manifest, ShardInfo, manifest_lock, read_manifest, write_manifest
from todi.storage.schema import (
    MANIFEST_NAME,
    SHARD_SUFFIX,
    Sample,
    ShardFormatError,
    ShardSetMetadata,
    check_sample,
    shard_schema,
)

# Positions per Parquet row group (~7 MB at k = 64). Readers decode a row group in slices,
# so this bounds the compressed bytes in flight; each row group repeats the shard's codec
# table once (~15-40 KB), so groups should not be small.
ROW_GROUP_POSITIONS = 65_536


def _sample_block(samples: list[Sample]) -> RowBlock:
    return RowBlock(
        sample_ids=[s.sample_id for s in samples],
        input_ids=[np.asarray(s.input_ids, dtype=np.int32) for s in samples],
        prompt_lens=np.array([s.prompt_len for s in samples], dtype=np.int64),
        positions=np.array([s.num_positions for s in samples], dtype=np.int64),
    )


def encode_table(
    samples: list[Sample], metadata: ShardSetMetadata, where: str = "write"
) -> pa.Table:
    """Validate and encode samples into one Arrow table of the shard schema."""
    try:
        codec = get_codec(metadata.codec)
    except ValueError as exc:
        raise ShardFormatError(f"{where}: {exc}") from None
    for s in samples:
        check_sample(s, metadata, where)
    block = _sample_block(samples)
    columns = {}
    if metadata.top_k:
        columns = codec.encode_rows(
            [np.asarray(s.topk_ids) for s in samples],
            [np.asarray(s.topk_logprobs, dtype=np.float32) for s in samples],
            block,
            vocab_size=metadata.vocab_size,
            top_k=metadata.top_k,
        )
    columns |= _target_columns(samples, metadata, where)
    schema = shard_schema(metadata)
    return pa.table(
        {
            "sample_id": pa.array(block.sample_ids, pa.string()),
            "input_ids": pa.array(block.input_ids, pa.list_(pa.int32())),
            "prompt_len": pa.array(block.prompt_lens, pa.int32()),
            **columns,
        },
        schema=schema.with_metadata(metadata.footer()),
    )


def _target_columns(
    samples: list[Sample], metadata: ShardSetMetadata, where: str
) -> dict[str, pa.Array]:
    """The `draws` and `tail_logz` columns of a sampled / re-temperable set."""
    out = {}
    try:
        if metadata.targets == "sampled":
            out["draws"] = pa.array(
                [
                    encode_draws(s.draws, vocab_size=metadata.vocab_size, draws=metadata.draws)
                    for s in samples
                ],
                pa.binary(),
            )
        if metadata.retemper_temperatures:
            out["tail_logz"] = pa.array([encode_tail(s.tail_logz) for s in samples], pa.binary())
    except DrawsError as exc:
        raise ShardFormatError(f"{where}: {exc}") from None
    return out


def shard_bytes(
    samples: list[Sample],
    metadata: ShardSetMetadata,
    *,
    row_group_positions: int = ROW_GROUP_POSITIONS,
    where: str = "write",
) -> bytes:
    """The bytes of one shard file holding `samples` (Parquet, footer metadata included)."""
    if not samples:
        raise ShardFormatError(f"{where}: no samples")
    table = encode_table(samples, metadata, where)
    codec = get_codec(metadata.codec)
    buf = io.BytesIO()
    # Per-column settings are keyed by the Parquet column path (lists: "name.list.element").
    compression = {"sample_id": "zstd", "input_ids.list.element": "zstd", "prompt_len": "zstd"}
    if metadata.top_k:
        compression |= codec.compression
    compression |= {"draws": "zstd", "tail_logz": "zstd"}
    compression = {c: kind for c, kind in compression.items() if _has_column(table, c)}
    options: dict[str, Any] = {
        "compression": compression,
        "compression_level": {c: 9 for c, kind in compression.items() if kind == "zstd"},
        "use_dictionary": list(codec.dictionary) if metadata.top_k else [],
        "write_page_checksum": True,
        "write_statistics": False,
    }
    with pq.ParquetWriter(buf, table.schema, **options) as writer:
        start, positions = 0, 0
        counts = [s.num_positions for s in samples]
        for i, n in enumerate(counts):
            positions += n
            if positions >= row_group_positions or i == len(counts) - 1:
                writer.write_table(table.slice(start, i + 1 - start), row_group_size=1 << 30)
                start, positions = i + 1, 0
    return buf.getvalue()


def _has_column(table: pa.Table, path: str) -> bool:
    return path.split(".")[0] in table.column_names


def write_shard(
    location: str | os.PathLike[str],
    samples: list[Sample],
    metadata: ShardSetMetadata,
    *,
    filesystem: pafs.FileSystem | None = None,
    row_group_positions: int = ROW_GROUP_POSITIONS,
) -> ShardInfo:
    """Write one whole shard file under a fresh unique name; it is not yet in the manifest."""
    fs, root = sfs.resolve(location, filesystem)
    data = shard_bytes(samples, metadata, row_group_positions=row_group_positions, where=root)
    fs.create_dir(root, recursive=True)
    name = f"part-{uuid.uuid4().hex[:16]}{SHARD_SUFFIX}"
    sfs.write_bytes_atomic(fs, sfs.join(root, name), data)
    return ShardInfo(
        file=name,
        rows=len(samples),
        positions=sum(s.num_positions for s in samples),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def commit_shards(
    location: str | os.PathLike[str],
    metadata: ShardSetMetadata,
    shards: Iterable[ShardInfo] = (),
    *,
    complete: bool | None = None,
    job: dict[str, Any] | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> Manifest:
    """Add whole shards to the manifest (creating it if needed) in one atomic replace.

    Refuses, naming every difference, when the set was written with another signature
    (teacher, tokenizer, vocabulary, k, temperature, log-prob mode, codec).
    """
    fs, root = sfs.resolve(location, filesystem)
    fs.create_dir(root, recursive=True)
    with manifest_lock(fs, root):
        if sfs.exists(fs, sfs.join(root, MANIFEST_NAME)):
            manifest = read_manifest(fs, root)
            diffs = manifest.metadata.signature_differences(metadata)
            if diffs:
                raise ShardFormatError(
                    f"{root}: cannot add to a shard set written with another signature "
                    f"(existing != new): {'; '.join(diffs)}"
                )
        else:
            manifest = Manifest(metadata=metadata)
        known = {s.file for s in manifest.shards}
        new = [s for s in shards if s.file not in known]
        manifest.shards = [*manifest.shards, *new]
        if complete is not None:
            manifest.complete = complete
        if job is not None:
            manifest.job = job
        write_manifest(fs, root, manifest)
        return manifest


class ShardSetWriter:
    """Buffered, append-capable writer for one process.

    Samples are buffered until `positions_per_shard` positions, then written as one shard
    and committed. `close(complete=True)` marks the set complete. Used as a context manager,
    an exception still commits the whole samples already buffered and leaves complete=false.
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        metadata: ShardSetMetadata,
        *,
        positions_per_shard: int = 262_144,
        job: dict[str, Any] | None = None,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        self.fs, self.root = sfs.resolve(location, filesystem)
        self.metadata = metadata
        self.positions_per_shard = positions_per_shard
        self._buffer: list[Sample] = []
        self._buffered_positions = 0
        # A writer killed or out of disk before may have left temp files: this one removes
        # them (only those whose writer process on this host is gone).
        self.removed_temp_files = sfs.remove_stale_temp_files(self.fs, self.root)
        # Creating/validating the manifest up front refuses a signature clash before any work.
        self.manifest = commit_shards(
            self.root, metadata, complete=False, job=job, filesystem=self.fs
        )

    def write(self, sample: Sample) -> None:
        check_sample(sample, self.metadata, self.root)
        self._buffer.append(sample)
        self._buffered_positions += sample.num_positions
        if self._buffered_positions >= self.positions_per_shard:
            self.flush()

    def write_many(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            self.write(s)

    def flush(self) -> ShardInfo | None:
        """Write and commit the buffered samples as one shard (if any)."""
        if not self._buffer:
            return None
        info = write_shard(self.root, self._buffer, self.metadata, filesystem=self.fs)
        self.manifest = commit_shards(self.root, self.metadata, [info], filesystem=self.fs)
        self._buffer, self._buffered_positions = [], 0
        return info

    def close(self, complete: bool = True) -> Manifest:
        self.flush()
        self.manifest = commit_shards(
            self.root, self.metadata, complete=complete, filesystem=self.fs
        )
        return self.manifest

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)
