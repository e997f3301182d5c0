"""Reading shard sets: streaming samples, verification, and the files for Ray Data."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from todi.storage import fs as sfs
from todi.storage.codec import CodecError, RowBlock, get_codec
from todi.storage.draws import DrawsError, decode_draws, decode_tail
from todi.storage.manifest import Manifest, ShardInfo, read_manifest
from todi.storage.schema import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    Sample,
    ShardFormatError,
    ShardSetMetadata,
    check_sample,
    first_position,
    metadata_json,
    shard_schema,
)


def _plain(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _row_block(table: pa.Table | pa.RecordBatch, where: str) -> RowBlock:
    """The plain columns as numpy without per-row Python conversion."""
    sample_ids = _plain(table.column("sample_id")).to_pylist()
    ids_col = _plain(table.column("input_ids"))
    offsets = ids_col.offsets.to_numpy()
    # one writable copy for the whole batch (Arrow buffers are read-only)
    values = ids_col.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=True)
    if ids_col.null_count or _plain(table.column("prompt_len")).null_count:
        raise ShardFormatError(f"{where}: null input_ids or prompt_len")
    input_ids = [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    prompt_lens = _plain(table.column("prompt_len")).to_numpy(zero_copy_only=False)
    prompt_lens = prompt_lens.astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    for i in np.flatnonzero((lengths < 2) | (prompt_lens < 0) | (prompt_lens >= lengths)):
        raise ShardFormatError(
            f"{where}: sample {sample_ids[i]!r}: {lengths[i]} tokens with prompt_len "
            f"{prompt_lens[i]} (need >= 2 tokens and 0 <= prompt_len < tokens)"
        )
    first = np.maximum(prompt_lens - 1, 0)
    return RowBlock(sample_ids, input_ids, prompt_lens, lengths - 1 - first)


def decode_table(
    table: pa.Table | pa.RecordBatch,
    metadata: ShardSetMetadata,
    where: str = "shard",
    *,
    validate: bool = True,
) -> list[Sample]:
    """Decode rows of the shard schema (any batch of rows, from one shard or several) into
    Samples. Errors are ShardFormatError naming `where`, the sample and the problem.

    `validate` checks every sample against the metadata (vocabulary, shapes, log-prob range).
    """
    try:
        codec = get_codec(metadata.codec)
    except ValueError as exc:
        raise ShardFormatError(f"{where}: {exc}") from None
    missing = [f.name for f in shard_schema(metadata) if f.name not in table.column_names]
    if missing:
        raise ShardFormatError(
            f"{where}: missing column(s) {', '.join(missing)} of codec {metadata.codec}"
        )
    block = _row_block(table, where)
    if metadata.top_k:
        columns = {f.name: table.column(f.name) for f in codec.columns}
        try:
            ids, lps = codec.decode_rows(
                columns, block, vocab_size=metadata.vocab_size, top_k=metadata.top_k
            )
        except CodecError as exc:
            sid = block.sample_ids[exc.row] if exc.row is not None else "?"
            raise ShardFormatError(f"{where}: sample {sid!r}: {exc}") from None
    else:
        ids = [np.zeros((int(n), 0), dtype=np.int32) for n in block.positions]
        lps = [np.zeros((int(n), 0), dtype=np.float32) for n in block.positions]
    draws, tails = _target_columns(table, metadata, block, where)
    out = []
    for r, sid in enumerate(block.sample_ids):
        sample = Sample(
            sid, block.input_ids[r], int(block.prompt_lens[r]), ids[r], lps[r], draws[r], tails[r]
        )
        if validate:
            check_sample(sample, metadata, where, topk_values=not codec.validated)
        out.append(sample)
    return out


def _target_columns(
    table: pa.Table | pa.RecordBatch, metadata: ShardSetMetadata, block: RowBlock, where: str
) -> tuple[list, list]:
    """Per row: the decoded draws (or None) and tail_logz (or None)."""
    rows = len(block.sample_ids)
    draws: list = [None] * rows
    tails: list = [None] * rows
    r = 0
    try:
        if metadata.targets == "sampled":
            values = _plain(table.column("draws")).to_pylist()
            for r in range(rows):
                draws[r] = decode_draws(
                    values[r],
                    int(block.positions[r]),
                    vocab_size=metadata.vocab_size,
                    draws=metadata.draws,
                )
        grid = len(metadata.retemper_temperatures)
        if grid:
            values = _plain(table.column("tail_logz")).to_pylist()
            for r in range(rows):
                tails[r] = decode_tail(values[r], int(block.positions[r]), grid)
    except (DrawsError, TypeError) as exc:
        raise ShardFormatError(f"{where}: sample {block.sample_ids[r]!r}: {exc}") from None
    return draws, tails


DECODE_POSITIONS = 16_384  # positions decoded at once: bounds the decoder's temporaries


def _slices(table: pa.Table, positions: int) -> Iterator[pa.Table]:
    """Consecutive row slices of about `positions` stored positions each (by token count)."""
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    start, acc = 0, 0
    for i, n in enumerate(lengths):
        acc += int(n)
        if acc >= positions:
            yield table.slice(start, i + 1 - start)
            start, acc = i + 1, 0
    if start < len(lengths):
        yield table.slice(start)


def _read_dictionary(meta: ShardSetMetadata) -> list[str]:
    if not meta.top_k:  # no codec columns (draws only)
        return []
    try:
        return list(get_codec(meta.codec).dictionary)
    except ValueError:
        return []


def _physical(schema: pa.Schema) -> pa.Schema:
    """Schema without metadata and with dictionary columns as their value type."""
    fields = [
        pa.field(f.name, f.type.value_type, f.nullable)
        if pa.types.is_dictionary(f.type)
        else f.remove_metadata()
        for f in schema
    ]
    return pa.schema(fields)


@dataclass
class ShardSet:
    """An opened shard set. Iterating streams samples shard by shard, row group by row group.

    Each shard file is read whole (a few MB), checked against the manifest's size and sha256,
    then decoded one row group at a time: memory is bounded by one shard's bytes plus one
    decoded row group, never the whole set.
    """

    fs: pafs.FileSystem
    root: str
    manifest: Manifest
    verify_checksums: bool = True
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

    def path(self, info: ShardInfo) -> str:
        return sfs.join(self.root, info.file)

    def _read(self, info: ShardInfo) -> bytes:
        path = self.path(info)
        try:
            data = sfs.read_bytes(self.fs, path)
        except FileNotFoundError:
            raise ShardFormatError(f"{path}: listed in the manifest but missing") from None
        except OSError as exc:
            raise ShardFormatError(f"{path}: cannot read ({exc})") from None
        if len(data) != info.bytes:
            raise ShardFormatError(
                f"{path}: {len(data)} bytes, the manifest says {info.bytes} (truncated or replaced)"
            )
        if self.verify_checksums and hashlib.sha256(data).hexdigest() != info.sha256:
            raise ShardFormatError(f"{path}: sha256 differs from the manifest (corrupted)")
        return data

    def open_shard_file(self, info: ShardInfo, data: bytes | None = None) -> pq.ParquetFile:
        """The shard's ParquetFile after the checks: size, sha256, footer == manifest, schema."""
        path = self.path(info)
        if data is None:
            data = self._read(info)
        try:
            pf = pq.ParquetFile(
                pa.BufferReader(data),
                read_dictionary=_read_dictionary(self._meta),
                page_checksum_verification=True,
            )
        except (pa.ArrowException, OSError) as exc:
            raise ShardFormatError(f"{path}: not a readable Parquet file ({exc})") from None
        file_meta = ShardSetMetadata.from_footer(pf.schema_arrow.metadata, path)
        if file_meta.format_version > FORMAT_VERSION:
            raise ShardFormatError(
                f"{path}: format_version {file_meta.format_version} is newer than this reader "
                f"({FORMAT_VERSION}); upgrade todi-distill"
            )
        diffs = file_meta.signature_differences(self._meta)
        if diffs:
            raise ShardFormatError(
                f"{path}: footer metadata disagrees with the manifest (file != manifest): "
                f"{'; '.join(diffs)}"
            )
        try:
            want = shard_schema(self._meta)
        except ValueError as exc:
            raise ShardFormatError(f"{path}: {exc}") from None
        if not _physical(pf.schema_arrow).equals(want):
            raise ShardFormatError(
                f"{path}: columns {pf.schema_arrow.names} differ from the shard schema of codec "
                f"{self._meta.codec} ({want.names})"
            )
        if pf.metadata.num_rows != info.rows:
            raise ShardFormatError(
                f"{path}: {pf.metadata.num_rows} rows, the manifest says {info.rows}"
            )
        return pf

    def iter_shard(
        self, info: ShardInfo, *, validate: bool = True, _pf: pq.ParquetFile | None = None
    ) -> Iterator[Sample]:
        """Samples of one listed shard; checks its rows and positions against the manifest."""
        pf = self.open_shard_file(info) if _pf is None else _pf
        path = self.path(info)
        positions = 0
        for i in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(i)
            except (pa.ArrowException, OSError) as exc:
                raise ShardFormatError(f"{path}: row group {i} unreadable ({exc})") from None
            for part in _slices(table, DECODE_POSITIONS):
                samples = decode_table(part, self._meta, path, validate=validate)
                positions += sum(s.num_positions for s in samples)
                yield from samples
        if positions != info.positions:
            raise ShardFormatError(
                f"{path}: {positions} positions, the manifest says {info.positions}"
            )

    def iter_samples(
        self, shards: Iterable[ShardInfo] | None = None, *, seed: int | None = None
    ) -> Iterator[Sample]:
        """Samples of `shards` (default: all listed), in manifest order or, with `seed`, in a
        shard order shuffled by it."""
        chosen = list(self.manifest.shards if shards is None else shards)
        if seed is not None:
            random.Random(f"todi-shards:{seed}").shuffle(chosen)
        for info in chosen:
            yield from self.iter_shard(info)

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples()

    def sample_ids(self) -> set[str]:
        """Ids of every sample in listed shards (reads only that column)."""
        ids: set[str] = set()
        for info in self.manifest.shards:
            pf = self.open_shard_file(info)
            ids.update(pf.read(columns=["sample_id"]).column(0).to_pylist())
        return ids

    def iter_batches(self, **kwargs) -> Iterator:
        """Padded training batches; see `todi.storage.batches.iter_batches`."""
        from todi.storage.batches import iter_batches

        kwargs.setdefault("meta", self.signature)
        return iter_batches(iter(self), **kwargs)


def _check_codec(metadata: ShardSetMetadata, where: str) -> None:
    try:
        get_codec(metadata.codec)
    except ValueError as exc:
        raise ShardFormatError(f"{where}: {exc}") from None


def open_shard_set(
    location: str | os.PathLike[str],
    *,
    filesystem: pafs.FileSystem | None = None,
    verify_checksums: bool = True,
) -> ShardSet:
    """Open a shard set (local path or pyarrow.fs URI) from its manifest."""
    fs, root = sfs.resolve(location, filesystem)
    manifest = read_manifest(fs, root)
    _check_codec(manifest.metadata, sfs.join(root, MANIFEST_NAME))
    return ShardSet(fs, root, manifest, verify_checksums)


@dataclass
class VerifyReport:
    root: str
    shards: int = 0
    rows: int = 0
    positions: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # stale temp files removed (clean=True)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard_set(
    location: str | os.PathLike[str],
    *,
    filesystem: pafs.FileSystem | None = None,
    clean: bool = False,
) -> VerifyReport:
    """Check every listed shard: size, sha256, Parquet page checksums, schema, footer
    metadata against the manifest, row and position counts, every sample's contents
    (vocabulary, shapes, finite non-positive log-probs) and duplicate sample ids.

    Problems name the offending file. Unlisted Parquet files (left by a crash before their
    manifest commit) and temp files of writers that are gone are warnings, not problems:
    readers never see them. `clean` removes those temp files (`report.removed`).
    """
    fs, root = sfs.resolve(location, filesystem)
    report = VerifyReport(root)
    try:
        manifest = read_manifest(fs, root)
        _check_codec(manifest.metadata, sfs.join(root, MANIFEST_NAME))
    except ShardFormatError as exc:
        report.problems.append(str(exc))
        return report
    shard_set = ShardSet(fs, root, manifest)
    seen: dict[str, str] = {}
    names = [info.file for info in manifest.shards]
    for name in {n for n in names if names.count(n) > 1}:
        report.problems.append(f"{sfs.join(root, name)}: listed more than once in the manifest")
    for info in manifest.shards:
        path = shard_set.path(info)
        try:
            pf = shard_set.open_shard_file(info)
            footer = ShardSetMetadata.from_footer(pf.schema_arrow.metadata, path)
            for name in type(footer).model_fields:
                ours, theirs = getattr(footer, name), getattr(manifest.metadata, name)
                if ours != theirs:
                    report.warnings.append(
                        f"{path}: footer {name} {ours!r} != manifest {theirs!r} (not part of "
                        "the signature)"
                    )
            rows = positions = 0
            for s in shard_set.iter_shard(info, _pf=pf):
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
        report.shards += 1
        report.rows += rows
        report.positions += positions
    listed = set(names)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (OSError, pa.ArrowException) as exc:
        report.warnings.append(f"{root}: cannot list the directory ({exc})")
        entries = []
    for entry in entries:
        if entry.base_name.endswith(SHARD_SUFFIX) and entry.base_name not in listed:
            report.warnings.append(f"{entry.path}: not listed in the manifest (ignored)")
    stale = sfs.stale_temp_files(fs, root)
    if clean:
        report.removed = sfs.remove_stale_temp_files(fs, root)
    else:
        for path in stale:
            report.warnings.append(
                f"{path}: temp file of a writer that is gone (remove with --clean)"
            )
    return report


__all__ = [
    "ShardSet",
    "VerifyReport",
    "decode_table",
    "first_position",
    "open_shard_set",
    "verify_shard_set",
]
