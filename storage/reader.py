"""Reading shard sets: streaming samples, verification, and the files for Ray Data."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage import fs as sfs
from storage.codec import get_codec
from storage.manifest import Manifest, ShardInfo, read_manifest
from storage.schema import (
    ARROW_SCHEMA,
    SHARD_SUFFIX,
    Sample,
    ShardFormatError,
    ShardSetMetadata,
    check_sample,
    expected_positions,
    metadata_json,
)


def decode_table(
    table: pa.Table | pa.RecordBatch, metadata: ShardSetMetadata, where: str = "shard"
) -> list[Sample]:
    """Decode rows of the shard schema into validated Samples."""
    codec = get_codec(metadata.codec)
    cols = {name: table.column(name).to_pylist() for name in ARROW_SCHEMA.names}
    out = []
    for sid, ids, plen, id_blob, lp_blob in zip(
        cols["sample_id"],
        cols["input_ids"],
        cols["prompt_len"],
        cols["topk_ids"],
        cols["topk_logprobs"],
        strict=True,
    ):
        input_ids = np.asarray(ids, dtype=np.int32)
        positions = expected_positions(len(input_ids), plen)
        try:
            topk_ids, topk_lps = codec.decode(
                id_blob, lp_blob, positions, metadata.top_k, metadata.vocab_size
            )
        except (ValueError, IndexError) as exc:
            raise ShardFormatError(f"{where}: sample {sid!r}: cannot decode top-k: {exc}") from None
        sample = Sample(sid, input_ids, int(plen), topk_ids, topk_lps)
        check_sample(sample, metadata, where)
        out.append(sample)
    return out


@dataclass
class ShardSet:
    """An opened shard set. Iterating streams samples shard by shard, row group by row group."""

    fs: pafs.FileSystem
    root: str
    manifest: Manifest
    _meta: ShardSetMetadata = field(init=False)

    def __post_init__(self) -> None:
        self._meta = self.manifest.metadata

    @property
    def metadata(self) -> dict:
        return metadata_json(self._meta)

    @property
    def signature(self) -> ShardSetMetadata:
        return self._meta

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def shards(self) -> list[ShardInfo]:
        return list(self.manifest.shards)

    @property
    def num_rows(self) -> int:
        return self.manifest.rows

    @property
    def num_positions(self) -> int:
        return self.manifest.positions

    def __len__(self) -> int:
        return self.num_rows

    def files(self) -> list[str]:
        """Paths of the listed shards inside `self.fs` (for Ray Data / pyarrow datasets)."""
        return [sfs.join(self.root, s.file) for s in self.manifest.shards]

    def _open(self, info: ShardInfo) -> pq.ParquetFile:
        path = sfs.join(self.root, info.file)
        try:
            f = self.fs.open_input_file(path)
        except FileNotFoundError:
            raise ShardFormatError(f"{path}: listed in the manifest but missing") from None
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardFormatError(f"{path}: not a readable Parquet file ({exc})") from None
        file_meta = ShardSetMetadata.from_footer(pf.schema_arrow.metadata, path)
        if file_meta != self._meta:
            diffs = file_meta.signature_differences(self._meta) or ["non-signature fields"]
            raise ShardFormatError(
                f"{path}: footer metadata disagrees with the manifest: {'; '.join(diffs)}"
            )
        if not pf.schema_arrow.remove_metadata().equals(ARROW_SCHEMA):
            raise ShardFormatError(f"{path}: columns differ from the shard schema v1")
        return pf

    def iter_shard(self, info: ShardInfo) -> Iterator[Sample]:
        pf = self._open(info)
        path = sfs.join(self.root, info.file)
        for i in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(i)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ShardFormatError(f"{path}: row group {i} unreadable ({exc})") from None
            yield from decode_table(table, self._meta, path)

    def __iter__(self) -> Iterator[Sample]:
        for info in self.manifest.shards:
            yield from self.iter_shard(info)

    def sample_ids(self) -> set[str]:
        """Ids of every sample in listed shards (reads only that column)."""
        ids: set[str] = set()
        for info in self.manifest.shards:
            pf = self._open(info)
            ids.update(pf.read(columns=["sample_id"]).column(0).to_pylist())
        return ids

    def iter_batches(self, **kwargs) -> Iterator:
        """Padded training batches; see `storage.batches.iter_batches`."""
        from storage.batches import iter_batches

        return iter_batches(iter(self), **kwargs)


def open_shard_set(
    location: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None
) -> ShardSet:
    """Open a shard set (local path or pyarrow.fs URI) from its manifest."""
    fs, root = sfs.resolve(location, filesystem)
    return ShardSet(fs, root, read_manifest(fs, root))


@dataclass
class VerifyReport:
    root: str
    shards: int = 0
    rows: int = 0
    positions: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard_set(
    location: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None
) -> VerifyReport:
    """Check every listed shard: checksum, size, schema, footer metadata, counts, contents.

    Problems name the offending file. Unlisted Parquet files (left by a crash before their
    manifest commit) are warnings, not problems: readers never see them.
    """
    fs, root = sfs.resolve(location, filesystem)
    report = VerifyReport(root)
    try:
        manifest = read_manifest(fs, root)
    except ShardFormatError as exc:
        report.problems.append(str(exc))
        return report
    shard_set = ShardSet(fs, root, manifest)
    seen: dict[str, str] = {}
    for info in manifest.shards:
        path = sfs.join(root, info.file)
        try:
            data = sfs.read_bytes(fs, path)
        except FileNotFoundError:
            report.problems.append(f"{path}: listed in the manifest but missing")
            continue
        if len(data) != info.bytes:
            report.problems.append(f"{path}: {len(data)} bytes, manifest says {info.bytes}")
            continue
        if hashlib.sha256(data).hexdigest() != info.sha256:
            report.problems.append(f"{path}: sha256 mismatch (corrupted or replaced)")
            continue
        try:
            rows = positions = 0
            for s in shard_set.iter_shard(info):
                rows += 1
                positions += s.num_positions
                if s.sample_id in seen:
                    report.problems.append(
                        f"{path}: sample {s.sample_id!r} also in {seen[s.sample_id]}"
                    )
                seen[s.sample_id] = info.file
        except ShardFormatError as exc:
            report.problems.append(str(exc))
            continue
        if (rows, positions) != (info.rows, info.positions):
            report.problems.append(
                f"{path}: {rows} rows / {positions} positions, manifest says "
                f"{info.rows} / {info.positions}"
            )
            continue
        report.shards += 1
        report.rows += rows
        report.positions += positions
    listed = {info.file for info in manifest.shards}
    selector = pafs.FileSelector(root, recursive=False)
    for entry in fs.get_file_info(selector):
        if entry.base_name.endswith(SHARD_SUFFIX) and entry.base_name not in listed:
            report.warnings.append(f"{entry.path}: not listed in the manifest (ignored)")
    return report
