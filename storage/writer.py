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

from storage import fs as sfs
from storage.codec import get_codec
from storage.manifest import Manifest, ShardInfo, manifest_lock, read_manifest, write_manifest
from storage.schema import (
    ARROW_SCHEMA,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    Sample,
    ShardFormatError,
    ShardSetMetadata,
    check_sample,
)

# Parquet settings: the codec already packs the top-k; zstd on top removes what is left.
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 9,
    "use_dictionary": ["sample_id"],
    "write_page_checksum": True,
}


def encode_table(samples: list[Sample], metadata: ShardSetMetadata) -> pa.Table:
    """Validate and encode samples into one Arrow table of the shard schema."""
    codec = get_codec(metadata.codec)
    ids_blobs, lp_blobs = [], []
    for s in samples:
        check_sample(s, metadata, "write")
        a, b = codec.encode(s.topk_ids, s.topk_logprobs, metadata.vocab_size)
        ids_blobs.append(a)
        lp_blobs.append(b)
    return pa.table(
        {
            "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
            "input_ids": pa.array(
                [np.asarray(s.input_ids, dtype=np.int32) for s in samples], pa.list_(pa.int32())
            ),
            "prompt_len": pa.array([s.prompt_len for s in samples], pa.int32()),
            "topk_ids": pa.array(ids_blobs, pa.binary()),
            "topk_logprobs": pa.array(lp_blobs, pa.binary()),
        },
        schema=ARROW_SCHEMA.with_metadata(metadata.footer()),
    )


def write_shard(
    location: str | os.PathLike[str],
    samples: list[Sample],
    metadata: ShardSetMetadata,
    *,
    filesystem: pafs.FileSystem | None = None,
    row_group_rows: int = 256,
) -> ShardInfo:
    """Write one whole shard file under a fresh unique name; it is not yet in the manifest."""
    if not samples:
        raise ShardFormatError("write_shard: no samples")
    fs, root = sfs.resolve(location, filesystem)
    fs.create_dir(root, recursive=True)
    table = encode_table(samples, metadata)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows, **_PARQUET_OPTIONS)
    data = buf.getvalue()
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
        # Creating/validating the manifest up front refuses a signature clash before any work.
        self.manifest = commit_shards(
            self.root, metadata, complete=False, job=job, filesystem=self.fs
        )

    def write(self, sample: Sample) -> None:
        check_sample(sample, self.metadata, "write")
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
