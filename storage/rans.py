"""Vectorized static rANS and bit packing in numpy: the entropy coder under the top-k codec.

rANS (range asymmetric numeral systems, Duda 2013) codes a symbol s of probability f_s / M
into a state x:   C(s, x) = (x // f_s) * M + x % f_s + c_s       (encode, last symbol first)
                  D(x) = (s, f_s * (x >> log2 M) + (x & (M-1)) - c_s)   with s = lut[x & (M-1)]
so a symbol costs log2(M / f_s) bits: the Shannon cost of the model, to within ~0.01 bit.

Python cannot afford a loop per symbol, so the work is spread over many independent *lanes*
(each a separate rANS state) that advance in lock step: one numpy operation advances every
lane by one step. Each step codes a PAIR of symbols (a log-prob delta, then an id) with one
renormalization, which is valid for a 64-bit state when M**2 divides the lower bound L:

    state x in [L, 2**32 * L), L = 2**32, words of 32 bits, M = 2**14.
    decode: x -> D1 -> D2 -> if x < L: x = (x << 32) | next word of this lane
    encode: if x >= 2**36 * f1 * f2: emit the low word, x >>= 32; then x = C1(s1, C2(s2, x))

(C2 maps [2**4 f1 f2, 2**36 f1 f2) onto [2**18 f1, 2**50 f1), and C1 maps that onto [L, 2**64),
so one emitted word per pair always suffices.) The encoder starts each lane at x = L; the
decoder must end every lane at exactly L having consumed exactly its words: a free integrity
check on every decode.
"""

from __future__ import annotations

import numpy as np

PROB_BITS = 14
M = 1 << PROB_BITS
MASK = np.uint64(M - 1)
STATE_LOW = np.uint64(1 << 32)
_U32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_SP = np.uint64(PROB_BITS)
_EMIT_SHIFT = np.uint64(36)  # 64 - 2 * PROB_BITS


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """[C, A] symbol counts -> [C, A] frequencies summing to M per row, >= 1 where count > 0.

    A row without counts gets all its mass on symbol 0 (it is never used).
    """
    counts = np.asarray(counts, dtype=np.int64)
    freqs = np.zeros(counts.shape, dtype=np.int64)
    for row in range(counts.shape[0]):
        c = counts[row]
        total = int(c.sum())
        if total == 0:
            freqs[row, 0] = M
            continue
        present = c > 0
        if int(present.sum()) > M:
            raise ValueError(f"{int(present.sum())} distinct symbols exceed the precision {M}")
        f = np.where(present, np.maximum(1, (c * M) // total), 0)
        diff = M - int(f.sum())
        order = np.argsort(-f, kind="stable")
        i = 0
        while diff != 0:  # hand the rounding remainder to (or take it from) the largest
            s = order[i % len(order)]
            if diff > 0:
                f[s] += diff
                diff = 0
            elif f[s] > 1:
                take = min(-diff, int(f[s]) - 1)
                f[s] -= take
                diff += take
            i += 1
        freqs[row] = f
    return freqs


class RansTables:
    """Per-context frequency tables and the decoder's slot lookup tables."""

    def __init__(self, freqs: np.ndarray) -> None:
        freqs = np.asarray(freqs, dtype=np.int64)
        if (freqs.sum(axis=1) != M).any() or (freqs < 0).any():
            raise ValueError("frequency table rows must be non-negative and sum to 2**14")
        self.freqs = freqs
        self.num_ctx, self.alphabet = freqs.shape
        self.cum = np.cumsum(freqs, axis=1) - freqs
        self._lut: tuple[np.ndarray, np.ndarray] | None = None

    def encode_params(self, ctx: np.ndarray, sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(f, c) as uint64 for symbols `sym` in contexts `ctx`; every symbol must have f > 0."""
        flat = ctx.astype(np.int64) * self.alphabet + sym
        f = self.freqs.reshape(-1)[flat]
        if f.size and f.min() <= 0:
            raise ValueError("symbol with zero frequency in its context")
        return f.astype(np.uint64), self.cum.reshape(-1)[flat].astype(np.uint64)

    def lut(self) -> tuple[np.ndarray, np.ndarray]:
        """Decoder tables indexed by ctx * M + slot: the symbol, and f << 32 | (slot - c)."""
        if self._lut is None:
            sym = np.empty(self.num_ctx * M, dtype=np.int64)
            for ctx in range(self.num_ctx):
                sym[ctx * M : (ctx + 1) * M] = np.repeat(np.arange(self.alphabet), self.freqs[ctx])
            ctx_of = np.repeat(np.arange(self.num_ctx), M)
            slot = np.tile(np.arange(M), self.num_ctx)
            f = self.freqs[ctx_of, sym]
            bias = slot - self.cum[ctx_of, sym]
            fb = (f.astype(np.uint64) << _S32) | bias.astype(np.uint64)
            self._lut = (sym.astype(np.int16), fb)
        return self._lut


class LaneSchedule:
    """Lock-step order of many lanes of different lengths.

    Lanes are sorted by length (descending, stable), so at step t the active lanes are a
    prefix `[:active[t]]` of the sorted order. Symbols live in *step-major* flat arrays:
    the symbol of sorted lane l at step t sits at `offset[t] + l`.
    """

    def __init__(self, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        self.lengths = lengths
        self.order = np.argsort(-lengths, kind="stable")  # sorted position -> lane
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(len(lengths))  # lane -> sorted position
        sorted_len = lengths[self.order]
        self.steps = int(sorted_len[0]) if len(lengths) else 0
        # active[t] = number of lanes with length > t
        self.active = np.searchsorted(-sorted_len, -np.arange(self.steps), side="left")
        self.offset = np.concatenate([[0], np.cumsum(self.active)])

    def flat_index(self, lane: np.ndarray, step: np.ndarray) -> np.ndarray:
        return self.offset[step] + self.rank[lane]


def rans_encode_pairs(
    schedule: LaneSchedule,
    f1: np.ndarray,
    c1: np.ndarray,
    f2: np.ndarray,
    c2: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode one (s1, s2) pair per lane per step; inputs are step-major (see LaneSchedule).

    Returns (final states uint64 [lanes], words uint32 grouped by lane in decode order,
    word counts per lane), lanes in their original (unsorted) order.
    """
    n_lanes = len(schedule.lengths)
    x = np.full(n_lanes, STATE_LOW, dtype=np.uint64)  # indexed by sorted position
    out_lanes: list[np.ndarray] = []
    out_words: list[np.ndarray] = []
    active, offset = schedule.active.tolist(), schedule.offset.tolist()
    for t in range(schedule.steps - 1, -1, -1):
        n, lo = active[t], offset[t]
        sl = slice(lo, lo + n)
        xa = x[:n]
        a1, b1, a2, b2 = f1[sl], c1[sl], f2[sl], c2[sl]
        # x >= 2**36 * f1 * f2, written so that f1 = f2 = M (certain symbols) cannot overflow
        emit = (xa >> _EMIT_SHIFT) >= a1 * a2
        idx = np.flatnonzero(emit)
        if idx.size:
            out_lanes.append(idx)
            out_words.append((xa[idx] & _U32).astype(np.uint32))
            xa[idx] >>= _S32
        q = xa // a2
        xa = (q << _SP) + (xa - q * a2) + b2
        q = xa // a1
        x[:n] = (q << _SP) + (xa - q * a1) + b1
    # Emitted last-step-first; the decoder reads each lane first-step-first.
    if out_lanes:
        lanes = np.concatenate(out_lanes[::-1])
        words = np.concatenate(out_words[::-1])
    else:
        lanes = np.zeros(0, dtype=np.int64)
        words = np.zeros(0, dtype=np.uint32)
    by_lane = np.argsort(lanes, kind="stable")
    counts_sorted = np.bincount(lanes, minlength=n_lanes)
    # Reorder everything from sorted positions back to lane order.
    words_sorted = words[by_lane]
    starts = np.concatenate([[0], np.cumsum(counts_sorted)])
    pieces = [words_sorted[starts[r] : starts[r + 1]] for r in schedule.rank]
    words_out = np.concatenate(pieces) if pieces else words_sorted
    return x[schedule.rank], words_out, counts_sorted[schedule.rank]


def rans_decode_pairs(
    schedule: LaneSchedule,
    states: np.ndarray,
    words: np.ndarray,
    word_start: np.ndarray,
    word_count: np.ndarray,
    tables: RansTables,
    ctx1: np.ndarray,
    ctx2: np.ndarray,
    ctx2_steps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the pairs of every lane; returns step-major s1, s2 and a bool[lanes] of lanes
    whose stream is inconsistent (final state != L or words not consumed exactly).

    `states`, `word_start`, `word_count` are in lane order; `words` is uint32. Every active
    lane codes step t in context `ctx1[t % len(ctx1)]` (first symbol) / `ctx2[...]` (second),
    or, given `ctx2_steps` (step-major like the output), the second symbol in its own context.
    """
    lut_sym, lut_fb = tables.lut()
    order = schedule.order
    x = states[order].astype(np.uint64)
    ptr = word_start[order].astype(np.int64)
    end = ptr + word_count[order]
    total = int(schedule.offset[-1])
    s1 = np.empty(total, dtype=np.int16)
    s2 = np.empty(total, dtype=np.int16)
    words = np.concatenate([words, np.zeros(1, np.uint32)]).astype(np.uint64)
    active, offset = schedule.active.tolist(), schedule.offset.tolist()
    base1 = [np.uint64(c * M) for c in ctx1]
    base2 = [np.uint64(c * M) for c in ctx2]
    period = len(base1)
    steps2 = None if ctx2_steps is None else ctx2_steps.astype(np.uint64) * np.uint64(M)
    for t in range(schedule.steps):
        n, lo = active[t], offset[t]
        i = t % period
        xa = x[:n]
        # D(x) = f * (x >> 14) + (slot - c): lut_fb packs f (high 32 bits) and slot - c.
        j = (xa & MASK) + base1[i]
        s1[lo : lo + n] = lut_sym[j]
        fb = lut_fb[j]
        xa = (fb >> _S32) * (xa >> _SP) + (fb & _U32)
        j = (xa & MASK) + (base2[i] if steps2 is None else steps2[lo : lo + n])
        s2[lo : lo + n] = lut_sym[j]
        fb = lut_fb[j]
        xa = (fb >> _S32) * (xa >> _SP) + (fb & _U32)
        need = xa < STATE_LOW
        p = ptr[:n]
        w = np.take(words, p, mode="clip")
        x[:n] = np.where(need, (xa << _S32) | w, xa)
        p += need
    bad_sorted = (x != STATE_LOW) | (ptr != end)
    return s1, s2, bad_sorted[schedule.rank]


def pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate `values[i]` as `widths[i]`-bit big-endian fields (widths <= 32)."""
    widths = np.asarray(widths, dtype=np.int64)
    total = int(widths.sum())
    if total == 0:
        return b""
    keep = widths > 0
    v = np.asarray(values, dtype=np.uint64)[keep]
    w = widths[keep]
    off = (np.cumsum(widths) - widths)[keep]
    word = off >> 5
    # The field, left-aligned in a 64-bit window that starts at its first 32-bit word.
    window = v << (64 - w - (off & 31)).astype(np.uint64)
    n_words = (total + 31) // 32 + 1
    # Fields are disjoint, so summing them as float64 (< 2**32 per word) is exact.
    hi = np.bincount(word, weights=(window >> _S32).astype(np.float64), minlength=n_words)
    lo = np.bincount(word + 1, weights=(window & _U32).astype(np.float64), minlength=n_words)
    out = (hi + lo).astype(">u4").tobytes()
    return out[: (total + 7) // 8]


def unpack_bits(buf: bytes | np.ndarray, bit_offsets: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of pack_bits for fields at absolute bit offsets (widths <= 32) -> uint64.

    A zero-width field reads as 0.
    """
    raw = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes | bytearray) else buf
    if len(widths) == 0:
        return np.zeros(0, dtype=np.uint64)
    off = np.asarray(bit_offsets, dtype=np.int64)
    if int((off + widths).max()) > 8 * len(raw) or int(off.min()) < 0:
        raise ValueError("raw bit stream shorter than its symbols need")
    padded = np.concatenate([raw, np.zeros(8, np.uint8)])
    windows = np.ndarray((len(padded) - 7,), dtype=">u8", buffer=padded, strides=(1,))
    w = windows[off >> 3].astype(np.uint64)
    w <<= (off & 7).astype(np.uint64)
    # numpy defines x >> 64 as 0 for uint64, so zero-width fields need no special case.
    w >>= (64 - widths.astype(np.int64)).astype(np.uint64)
    return w
