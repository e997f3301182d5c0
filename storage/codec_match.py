"""`rans-q32-v2`: `rans-q32-v1` with a context-match id model.

The teacher's top-k after a token looks much like its top-k the last time the same token (or
the same two tokens) came by in the sequence: in real SmolLM2-135M top-64 output, 37% of the
ids that are not the next token appear in the lists of the (at most two) earlier positions
chosen below, and such an id costs ~3-6 bits as "rank t in that list" instead of ~11 bits as
its number in the shard's frequency order (bench/bench_storage.py: 1.815 -> ~1.65 B/entry).

Sources of stored position p of a row (c = the row's current tokens: input_ids[first + p],
first = max(prompt_len - 1, 0); everything here depends only on input_ids, which the reader
has before decoding anything):
    A  = the latest q < p with c[q] == c[p] and c[q-1] == c[p-1] (p, q >= 1), if any;
    B1 = the latest q < p with c[q] == c[p]; B2 = the latest q < B1 with c[q] == c[p];
    sources = (A, B2) if A == B1, (A, B1) if A is another position, else (B1, B2),
    missing ones dropped; h = their number (0, 1 or 2).
Candidate t (0 <= t < 2k) is rank t % k of source t // k (duplicates are not removed).

Per entry the id is coded as:
    - the actual next token: value 0, as in v1;
    - else, when a candidate holds it: match value t (the smallest such t), symbol
      ALPHABET + to_symbols(t) with its raw bits;
    - else: v1's number n in the shard frequency order (next-token swap included).
The id symbol's frequency table is chosen by (h, rank group): 3 x 7 id contexts at k = 64
(log-prob deltas keep v1's 7). Everything else (lanes, pairs, raw bits, row layout, table
column) is v1's; the table has magic TKR2 and ALPHABET + hit_symbols(k) columns.

Decoding: the rANS and raw-bit stages are v1's kernels with per-entry id contexts; a match
entry then copies its id from an earlier position of the same row (pointer jumping in numpy,
since a match may point at a match).
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np

from todi.storage import _jit, rans
from todi.storage.codec import (
    ALPHABET,
    SYMBOL_BASE,
    SYMBOL_BITS,
    CodecError,
    RansQ32,
    RowBlock,
    ShardTable,
    _quantize,
    _rank_order,
    _Symbols,
    to_symbols,
)

MATCH = 1 << 40  # decoded id values >= MATCH are match values t + MATCH
SOURCES = 2  # earlier positions whose lists are candidates
_MATCH_SLICE = 1 << 16  # positions per slice when the encoder looks for matches


@cache
def hit_symbols(top_k: int) -> int:
    """Symbols needed by the match values t < SOURCES * k."""
    return int(to_symbols(np.array([SOURCES * top_k - 1]))[0][0]) + 1


@lru_cache(maxsize=8)
def id_luts(top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """id symbol -> (raw bit count, value base); match symbols' bases carry MATCH."""
    hs = hit_symbols(top_k)
    return (
        np.concatenate([SYMBOL_BITS, SYMBOL_BITS[:hs]]),
        np.concatenate([SYMBOL_BASE, SYMBOL_BASE[:hs] | MATCH]),
    )


class MatchTable(ShardTable):
    """v1's ShardTable with 3 id contexts per rank group and the match symbols."""

    magic = b"TKR2"
    id_contexts = 1 + SOURCES

    @classmethod
    def alphabet_for(cls, top_k: int) -> int:
        return ALPHABET + hit_symbols(top_k)


def match_sources(block: RowBlock, rows) -> np.ndarray:
    """int64 [positions of `rows` concatenated, SOURCES]: each position's sources as indices
    into that concatenation, -1 where missing (see the module docstring)."""
    parts, row_of = [], []
    for i, r in enumerate(rows):
        ids = block.input_ids[r]
        first = max(int(block.prompt_lens[r]) - 1, 0)
        p = int(block.positions[r])
        parts.append(np.asarray(ids[first : first + p], dtype=np.int64))
        row_of.append(np.full(p, i, np.int64))
    if not parts:
        return np.full((0, SOURCES), -1, np.int64)
    c = np.concatenate(parts)
    row = np.concatenate(row_of)
    n = len(c)
    g = np.arange(n)
    starts = np.concatenate([[0], np.cumsum([len(x) for x in parts])[:-1]]).astype(np.int64)
    # previous token within the row (-1 at a row's first position)
    b = np.concatenate([[-1], c[:-1]])
    b[starts[[len(x) > 0 for x in parts]]] = -1

    def latest_same(*keys: np.ndarray) -> np.ndarray:
        order = np.lexsort((g, *keys))  # by keys (last primary), then position
        same = np.ones(n - 1, dtype=bool) if n else np.zeros(0, bool)
        for key in keys:
            ks = key[order]
            same &= ks[1:] == ks[:-1]
        prev = np.full(n, -1, np.int64)
        prev[order[1:][same]] = order[:-1][same]
        return prev

    b1 = latest_same(c, row)
    a = latest_same(c, b, row)
    a[b < 0] = -1  # no two-token context at a row's first position
    b2 = np.where(b1 >= 0, b1[np.maximum(b1, 0)], -1)
    src = np.empty((n, SOURCES), np.int64)
    src[:, 0] = np.where(a >= 0, a, b1)
    src[:, 1] = np.where(a < 0, b2, np.where(a == b1, b2, b1))
    return src


class RansQ32Match(RansQ32):
    """See the module docstring. Same columns, layout and kernels as `rans-q32-v1`."""

    name = "rans-q32-v2"

    # -- encode

    def encode_rows(self, ids, logprobs, block, *, vocab_size, top_k):
        n_rows = len(ids)
        ordered = [
            _rank_order(np.asarray(i), np.asarray(lp)) for i, lp in zip(ids, logprobs, strict=True)
        ]
        all_ids = np.concatenate([o[0] for o in ordered]).astype(np.int64).reshape(-1, top_k)
        all_q = np.concatenate([_quantize(o[1], self.scale) for o in ordered]).reshape(-1, top_k)
        positions = block.positions.astype(np.int64)
        rows = range(n_rows)
        table = MatchTable.from_ids(all_ids, vocab_size, top_k)
        syms = self._symbols_v2(all_ids, all_q, block, rows, table)
        grp = np.broadcast_to(table.groups, all_ids.shape).reshape(-1)
        alphabet = MatchTable.alphabet_for(top_k)
        n_ctx = (1 + MatchTable.id_contexts) * table.num_groups
        counts = np.bincount(grp * alphabet + syms.s_dq, minlength=n_ctx * alphabet)
        counts += np.bincount(syms.c_id * alphabet + syms.s_id, minlength=n_ctx * alphabet)
        freqs = rans.normalize_counts(counts.reshape(n_ctx, alphabet))
        table = MatchTable(vocab_size, top_k, table.classes, freqs)
        table_blob = table.to_bytes()
        self._remember(table_blob, table)

        return self._columns(syms, table, table_blob, positions)

    def _symbols_v2(self, ids, q, block: RowBlock, rows, table: MatchTable) -> _Symbols:
        nxt = self._next_tokens(block, rows)
        rid = table.inverse[ids]
        rn = table.inverse[nxt][:, None]
        is_next = ids == nxt[:, None]
        n = np.where(is_next, 0, rid + (rid < rn))
        src = match_sources(block, rows)
        # matches in slices of whole rows (sources never leave their row): bounded memory
        t = np.empty(ids.shape, np.int64)
        ends = np.cumsum(block.positions[list(rows)])
        a = 0
        while a < len(ids):
            last = int(np.searchsorted(ends, a + _MATCH_SLICE, side="right")) - 1
            b = int(ends[last]) if last >= 0 else 0
            b = max(b, int(ends[np.searchsorted(ends, a, side="right")]))  # >= one row
            part = src[a:b]
            t[a:b] = self._match_index(ids[a:b], np.where(part >= 0, part - a, -1))
            a = b
        hit = (t >= 0) & ~is_next
        s_id, w_id, v_id = to_symbols(np.where(hit, t, n).reshape(-1))
        s_id = (s_id + np.where(hit.reshape(-1), ALPHABET, 0)).astype(np.int16)
        s_dq, w_dq, v_dq = to_symbols(np.diff(q, axis=1, prepend=0).reshape(-1))
        return _Symbols(s_dq, s_id, w_dq, v_dq, w_id, v_id, self._contexts(src, table))

    @staticmethod
    def _match_index(ids: np.ndarray, src: np.ndarray) -> np.ndarray:
        """[P, k] smallest candidate index holding each id, -1 where none does."""
        n_pos, k = ids.shape
        out = np.full(ids.shape, -1, np.int64)
        if n_pos == 0:
            return out
        # candidate (position, t) -> id; keyed by (position, id), first t wins
        cand_pos = np.repeat(np.arange(n_pos), SOURCES * k)
        t = np.tile(np.arange(SOURCES * k), n_pos)
        s = src[cand_pos, t // k]
        ok = s >= 0
        cand_pos, t = cand_pos[ok], t[ok]
        cand_id = ids[s[ok], t % k]
        span = int(ids.max()) + 1
        key = cand_pos * span + cand_id
        order = np.lexsort((t, key))
        key, t = key[order], t[order]
        first = np.concatenate([[True], key[1:] != key[:-1]]) if key.size else key.astype(bool)
        key, t = key[first], t[first]
        want = (np.arange(n_pos)[:, None] * span + ids).reshape(-1)
        at = np.minimum(np.searchsorted(key, want), max(len(key) - 1, 0))
        found = key[at] == want if key.size else np.zeros(want.shape, bool)
        out.reshape(-1)[found] = t[at[found]]
        return out

    @staticmethod
    def _contexts(src: np.ndarray, table: ShardTable) -> np.ndarray:
        """Absolute id context of every entry: after the log-prob contexts, (h, rank group)."""
        h = (src >= 0).sum(axis=1)
        g = table.num_groups
        return ((1 + h)[:, None] * g + table.groups[None, :]).reshape(-1).astype(np.int64)

    # -- decode hooks

    def table(self, blob: bytes) -> MatchTable:
        table = self._table_cache.get(blob)
        if table is None:
            table = MatchTable.from_bytes(blob)
            self._remember(blob, table)
        return table  # type: ignore[return-value]

    def _id_contexts(self, table, block, rows):
        return self._contexts(match_sources(block, rows), table)

    def _id_luts(self, table):
        return id_luts(table.top_k)

    def _ids(self, num, table, block, rows, bounds):
        k = table.top_k
        n_pos = num.shape[0]
        hit = num >= MATCH

        def bad(pos: int, what: str) -> CodecError:
            i = int(np.searchsorted(bounds, pos, side="right")) - 1
            return CodecError(f"top-k block is corrupted ({what})", int(rows[i]))

        miss = np.where(hit, 1, num)
        outside = np.flatnonzero(miss.max(axis=1, initial=0) >= table.vocab_size)
        if outside.size:
            raise bad(int(outside[0]), "id outside the vocabulary")
        nxt = self._next_tokens(block, rows)
        rn = table.inverse[nxt][:, None]
        ids = table.perm32[miss - (miss <= rn)]
        zero = miss == 0
        ids[zero] = np.broadcast_to(nxt[:, None], num.shape)[zero]
        hp, hj = np.nonzero(hit)
        if hp.size:
            t = num[hp, hj] - MATCH
            src = match_sources(block, rows)
            s = np.minimum(t // k, SOURCES - 1)
            q = src[hp, s]
            wrong = (t >= SOURCES * k) | (q < 0)
            if wrong.any():
                raise bad(int(hp[np.flatnonzero(wrong)[0]]), "match without a source")
            ids = ids.reshape(-1)
            entries = hp * k + hj  # ascending
            refs = q * k + t % k  # an entry of an earlier position
            if self.jit and _jit.ready():
                _jit.match_kernel()(ids, entries, refs)
            else:  # pointer jumping among the matches until every ref is a coded id
                hit_of = np.full(len(ids), -1, np.int64)
                hit_of[entries] = np.arange(len(entries))
                while True:
                    j = hit_of[refs]
                    chained = np.flatnonzero(j >= 0)
                    if not chained.size:
                        break
                    refs[chained] = refs[j[chained]]
                ids[entries] = ids[refs]
            ids = ids.reshape(n_pos, k)
        return ids
