"""`ans-q32-c1`: the `rans-q32-v1` model, entropy coded by `constriction` (compiled ANS).

The values are those of `rans-q32-v1` (see `storage.codec.RansQ32`): log-probs quantized to
1/32 nat and coded as rank deltas, ids as their number in the shard's frequency order with
the actual next token as number 0, each value split into a log-scale symbol plus raw low
bits. What changes is who codes the symbols, and one context:

- **Coder.** `constriction.stream.stack.AnsCoder` (Rust, maintained, on PyPI) with one
  `Categorical` model per context, built from the shard's stored frequencies. Each row
  (sequence) is one ANS stream of 32-bit words, so any set of rows decodes on its own. There
  is no hand-written coding kernel in this module: no lanes, no numba.
- **Contexts.** Log-prob deltas: the rank group (rank bit length), as in `rans-q32-v1`. Ids:
  the rank group *and* the entry's own quantized log-prob bucket: a token the teacher gives
  probability 0.3 is drawn from a different part of the frequency order than one at 1e-4,
  at the same rank. Deltas are decoded first, so the decoder knows every bucket before it
  decodes the ids.

Row layout (`topk_code`): u32 word count, the ANS words (u32), then the raw bits (log-prob
bits, byte pad, id bits, byte pad). `topk_table` holds `AnsTable` (id order, per-context
frequencies), dictionary-encoded like `rans-q32-v1`'s. Decoding and encoding are identical on
every platform (constriction's model construction is integer-exact from the stored counts).

Measured against `rans-q32-v1` in bench/bench_codec.py (results in bench/results/).
"""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np
import pyarrow as pa

from todi.storage.codec import (
    ALPHABET,
    LOGPROB_FLOOR,
    SYMBOL_BITS,
    CodecError,
    RansQ32,
    RowBlock,
    TopKCodec,
    _quantize,
    _rank_groups,
    _rank_order,
    _table_groups,
    code_blocks,
    from_symbols,
    pack_table,
    to_symbols,
    unpack_table,
)
from todi.storage.rans import pack_bits, unpack_bits

_MAGIC = b"TKA1"
_MIN_COUNT = 4  # as rans-q32-v1: ids seen fewer times are not worth a table entry
# Id context buckets of the quantized log-prob q (1/32 nat): edges in nats.
_Q_EDGES = np.array([0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 13], dtype=np.float64) * 32
NUM_Q = len(_Q_EDGES) + 1
FREQ_BITS = 16  # stored frequencies: counts scaled to at most 2**16 per context


def _import():
    try:
        import constriction
    except ImportError:  # pragma: no cover - the dev/codec extras install it
        raise CodecError(
            "the ans-q32-c1 codec needs the `constriction` package: "
            "pip install constriction (or pip install 'todi-distill[codec]')"
        ) from None
    return constriction


def q_bucket(q: np.ndarray) -> np.ndarray:
    return np.searchsorted(_Q_EDGES, q, side="right")


class AnsTable:
    """Per-shard statistics: the id order (as `rans-q32-v1`'s ShardTable) and the frequency
    table of every context (rank groups for deltas, rank group x log-prob bucket for ids)."""

    def __init__(self, vocab_size: int, top_k: int, classes: list[np.ndarray], freqs: np.ndarray):
        self.vocab_size, self.top_k, self.classes = vocab_size, top_k, classes
        explicit = np.concatenate(classes) if classes else np.zeros(0, np.int64)
        rest = np.ones(vocab_size, dtype=bool)
        rest[explicit] = False
        self.perm = np.concatenate([explicit, np.flatnonzero(rest)]).astype(np.int64)
        if len(self.perm) != vocab_size:
            raise ValueError("id table is not a permutation of the vocabulary")
        self.perm32 = self.perm.astype(np.int32)
        self.inverse = np.empty(vocab_size, dtype=np.int64)
        self.inverse[self.perm] = np.arange(vocab_size)
        self.groups = _rank_groups(top_k)
        self.num_groups = int(self.groups.max()) + 1
        if freqs.shape != (self.num_contexts, ALPHABET):
            raise ValueError("frequency table shape does not match k")
        self.freqs = freqs
        self._models: list | None = None
        # ranks of each group: a contiguous range [lo, hi)
        self.group_ranks = [np.flatnonzero(self.groups == g) for g in range(self.num_groups)]

    @property
    def num_contexts(self) -> int:
        return self.num_groups * (1 + NUM_Q)

    def models(self) -> list:
        if self._models is None:
            c = _import()
            self._models = [
                c.stream.model.Categorical(
                    f.astype(np.float64) / max(int(f.sum()), 1), perfect=False
                )
                for f in np.maximum(self.freqs, 0)
            ]
        return self._models

    @staticmethod
    def scale(counts: np.ndarray) -> np.ndarray:
        """Counts -> frequencies < 2**16 (>= 1 where the count is > 0)."""
        top = np.maximum(counts.max(axis=1, keepdims=True), 1)
        f = np.where(counts > 0, np.maximum(1, (counts * ((1 << FREQ_BITS) - 1)) // top), 0)
        f[f.sum(axis=1) == 0, 0] = 1  # an unused context: any valid distribution
        return f.astype(np.int64)

    @classmethod
    def id_classes(cls, all_ids: np.ndarray, vocab_size: int) -> list[np.ndarray]:
        counts = np.bincount(all_ids.reshape(-1), minlength=vocab_size)
        seen = np.flatnonzero(counts >= _MIN_COUNT)
        cls_of = np.floor(2 * np.log2(counts[seen])).astype(np.int64)
        return [seen[cls_of == c] for c in np.unique(cls_of)[::-1]]

    def to_bytes(self) -> bytes:
        return pack_table(_MAGIC, self.vocab_size, self.top_k, self.classes, self.freqs)

    @classmethod
    def from_bytes(cls, blob: bytes) -> AnsTable:
        return cls(*unpack_table(blob, _MAGIC))


def _id_context(table: AnsTable, q: np.ndarray) -> np.ndarray:
    """[P, k] quantized log-probs -> the id context of every entry (after the delta ones)."""
    grp = np.broadcast_to(table.groups, q.shape)
    return table.num_groups + grp * NUM_Q + q_bucket(q)


class AnsQ32Constriction(TopKCodec):
    """See the module docstring."""

    name = "ans-q32-c1"
    scale = 32
    columns = RansQ32.columns
    compression: ClassVar[dict[str, str]] = {"topk_code": "none", "topk_table": "none"}
    dictionary = ("topk_table",)
    max_logprob_error = 0.5 / 32 + 1e-6
    logprob_floor = LOGPROB_FLOOR
    validated = True

    def __init__(self) -> None:
        self._table_cache: dict[bytes, AnsTable] = {}

    _next_tokens = staticmethod(RansQ32._next_tokens)

    def _remember(self, blob: bytes, table: AnsTable) -> None:
        while len(self._table_cache) >= 8:
            self._table_cache.pop(next(iter(self._table_cache)), None)
        self._table_cache[blob] = table

    # -- encode

    def encode_rows(self, ids, logprobs, block, *, vocab_size, top_k):
        c = _import()
        ordered = [
            _rank_order(np.asarray(i), np.asarray(lp)) for i, lp in zip(ids, logprobs, strict=True)
        ]
        all_ids = np.concatenate([o[0] for o in ordered]).astype(np.int64).reshape(-1, top_k)
        all_q = np.concatenate([_quantize(o[1], self.scale) for o in ordered]).reshape(-1, top_k)
        nxt = self._next_tokens(block, range(len(ids)))
        classes = AnsTable.id_classes(all_ids, vocab_size)
        groups = _rank_groups(top_k)
        num_groups = int(groups.max()) + 1
        n_ctx = num_groups * (1 + NUM_Q)
        dummy = np.ones((n_ctx, ALPHABET), np.int64)
        table = AnsTable(vocab_size, top_k, classes, dummy)
        # values -> symbols (rans-q32-v1's), and their contexts
        rid = table.inverse[all_ids]
        rn = table.inverse[nxt][:, None]
        num = np.where(all_ids == nxt[:, None], 0, rid + (rid < rn))
        dq = np.diff(all_q, axis=1, prepend=0)
        s_dq, w_dq, v_dq = to_symbols(dq.reshape(-1))
        s_id, w_id, v_id = to_symbols(num.reshape(-1))
        ctx_dq = np.broadcast_to(groups, all_q.shape).reshape(-1)
        ctx_id = _id_context(table, all_q).reshape(-1)
        counts = np.zeros((n_ctx, ALPHABET), dtype=np.int64)
        np.add.at(counts, (ctx_dq, s_dq), 1)
        np.add.at(counts, (ctx_id, s_id), 1)
        table = AnsTable(vocab_size, top_k, classes, AnsTable.scale(counts))
        table_blob = table.to_bytes()
        table = AnsTable.from_bytes(table_blob)  # exactly what the decoder will use
        self._remember(table_blob, table)
        models = table.models()

        positions = block.positions.astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(positions)]) * top_k
        codes = []
        for r in range(len(ids)):
            e0, e1 = int(bounds[r]), int(bounds[r + 1])
            coder = c.stream.stack.AnsCoder()
            # a stack: encode the ids (decoded last) first, each in reverse context order
            self._encode_segments(coder, models, s_id[e0:e1], ctx_id[e0:e1])
            self._encode_segments(coder, models, s_dq[e0:e1], ctx_dq[e0:e1])
            words = coder.get_compressed().astype("<u4")
            raw = pack_bits(v_dq[e0:e1], w_dq[e0:e1]) + pack_bits(v_id[e0:e1], w_id[e0:e1])
            codes.append(struct.pack("<I", len(words)) + words.tobytes() + raw)
        return {
            "topk_code": pa.array(codes, pa.binary()),
            "topk_table": pa.array([table_blob] * len(ids), pa.binary()),
        }

    @staticmethod
    def _encode_segments(coder, models, symbols, contexts) -> None:
        order = np.argsort(contexts, kind="stable")
        ctx_sorted = contexts[order]
        sym_sorted = symbols[order].astype(np.int32)
        present, starts = np.unique(ctx_sorted, return_index=True)
        ends = np.append(starts[1:], len(ctx_sorted))
        for ctx, a, b in zip(present[::-1], starts[::-1], ends[::-1], strict=True):
            coder.encode_reverse(sym_sorted[a:b], models[int(ctx)])

    # -- decode

    def table(self, blob: bytes) -> AnsTable:
        table = self._table_cache.get(blob)
        if table is None:
            table = AnsTable.from_bytes(blob)
            self._remember(blob, table)
        return table

    def decode_rows(self, columns, block: RowBlock, *, vocab_size, top_k):
        c = _import()
        n_rows = len(block.positions)
        ids_out: list = [None] * n_rows
        lps_out: list = [None] * n_rows
        code = code_blocks(columns)
        for blob, rows in _table_groups(columns["topk_table"]):
            try:
                table = self.table(blob)
                models = table.models()
            except (ValueError, OSError, struct.error, IndexError, pa.ArrowException) as exc:
                raise CodecError(f"unreadable shard table: {exc}", int(rows[0])) from None
            if table.vocab_size != vocab_size or table.top_k != top_k:
                raise CodecError(
                    f"shard table is for vocab {table.vocab_size} / k {table.top_k}, "
                    f"metadata says {vocab_size} / {top_k}",
                    int(rows[0]),
                )
            nxt_all = self._next_tokens(block, rows)
            at = 0
            for r in rows:
                p = int(block.positions[r])
                buf = code[int(r)].as_buffer()
                try:
                    ids, lps = self._decode_row(c, table, models, buf, p, nxt_all[at : at + p])
                except (ValueError, IndexError, struct.error, RuntimeError) as exc:
                    raise CodecError(f"top-k block is corrupted ({exc})", int(r)) from None
                at += p
                ids_out[r], lps_out[r] = ids, lps
        return ids_out, lps_out

    def _decode_row(self, c, table: AnsTable, models, buf, positions: int, nxt: np.ndarray):
        k = table.top_k
        raw = np.frombuffer(buf, dtype=np.uint8)
        if raw.size < 4:
            raise ValueError("truncated")
        (n_words,) = struct.unpack_from("<I", raw)
        w_end = 4 + 4 * n_words
        if raw.size < w_end:
            raise ValueError(f"{raw.size} bytes, the header says {w_end}+")
        words = raw[4:w_end].view("<u4").astype(np.uint32)
        coder = c.stream.stack.AnsCoder(words)
        # deltas: rank groups are contiguous rank ranges, decoded in context order
        s_dq = np.empty((positions, k), dtype=np.int64)
        for g, ranks in enumerate(table.group_ranks):
            n = positions * len(ranks)
            seg = coder.decode(models[g], n) if n else np.zeros(0, np.int32)
            # encoder order: stable sort by context of the natural (position-major) order
            s_dq[:, ranks] = np.asarray(seg, dtype=np.int64).reshape(positions, len(ranks))
        s_dq = s_dq.reshape(-1)
        w_dq = SYMBOL_BITS[s_dq]
        dq_bits = int(w_dq.sum())
        off = 8 * w_end
        dq_raw = unpack_bits(raw, off + np.cumsum(w_dq) - w_dq, w_dq)
        dq = from_symbols(s_dq, dq_raw).reshape(positions, k)
        q = np.cumsum(dq, axis=1)
        # ids: their contexts follow from q
        ctx = _id_context(table, q).reshape(-1)
        order = np.argsort(ctx, kind="stable")
        present, starts = np.unique(ctx[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        s_sorted = np.empty(len(order), dtype=np.int64)
        for cx, a, b in zip(present, starts, ends, strict=True):
            s_sorted[a:b] = coder.decode(models[int(cx)], int(b - a))
        s_id = np.empty_like(s_sorted)
        s_id[order] = s_sorted
        if s_id.size and (s_id.max() >= ALPHABET or s_dq.max() >= ALPHABET):
            raise ValueError("symbol outside the alphabet")
        w_id = SYMBOL_BITS[s_id]
        id_off = off + 8 * ((dq_bits + 7) // 8)
        id_bits = int(w_id.sum())
        if raw.size != id_off // 8 + (id_bits + 7) // 8:
            raise ValueError("raw bits do not match")
        num = from_symbols(s_id, unpack_bits(raw, id_off + np.cumsum(w_id) - w_id, w_id))
        num = num.reshape(positions, k)
        if num.size and num.max() >= table.vocab_size:
            raise ValueError("id outside the vocabulary")
        rn = table.inverse[nxt][:, None]
        ids = table.perm32[num - (num <= rn)]
        zero = num == 0
        ids[zero] = np.broadcast_to(nxt[:, None], num.shape)[zero]
        lps = q.astype(np.float32) * np.float32(-1.0 / self.scale)
        return ids, lps
