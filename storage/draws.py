"""Sampled targets and re-tempering statistics: the two per-row columns beside the top-k codec.

`draws` (binary, one value per row): the teacher's N draws with replacement at each stored
position, as the unique ids drawn, how often each was drawn, and the teacher's log-prob of
each id (normalized over the full vocabulary at the set's temperature, like the top-k). Byte
layout of one row with P positions and M unique ids in all (little-endian, byte planes so that
zstd sees the low and high bytes of each array apart):

    n        uint8  [P]     unique ids per position (<= draws <= 255)
    ids      uint16 [M]     per position in ascending id order: the first id, then gaps to the
                            previous id  (uint32 when the vocabulary exceeds 65,536 ids)
    counts   uint8  [M]     times drawn (>= 1; they sum to `draws` at every position)
    q        uint16 [M]     round(-log p * 32), clamped to 65,535 (log p >= -2,048 nat)

`tail_logz` (binary, one value per row): for each temperature T_g of the set's
`retemper_temperatures` and each stored position, float16 [P, G] (position-major)

    f_g = log sum_{v not listed} exp(s_g * l_v),   s_g = T_capture / T_g,

where l is the teacher's log-prob at the capture temperature and "listed" are the ids the row
stores at that position (top-k ids and drawn ids). With it the trainer re-tempers exactly:
log p_{T_g}(v) = s_g l_v - Z_g with Z_g = logaddexp(logsumexp_listed(s_g l), f_g)
(docs/method.md, "One capture, any temperature").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from todi.common.errors import TodiError

DRAW_SCALE = 32  # log-prob quantization step 1/32 nat (max error 1/64), as the top-k codec
MAX_DRAWS = 255
_Q_MAX = 65_535


class DrawsError(TodiError, ValueError):
    """A `draws` or `tail_logz` value that cannot be decoded as the metadata says."""


@dataclass
class Draws:
    """Teacher draws at P positions, flattened: position t owns entries offsets[t]:offsets[t+1]."""

    offsets: np.ndarray  # int64 [P + 1]
    ids: np.ndarray  # int32 [M], ascending within a position
    counts: np.ndarray  # int32 [M], >= 1, sum per position = draws
    logprobs: np.ndarray  # float32 [M], log p (full vocabulary, capture temperature)

    @property
    def num_positions(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def per_position(self) -> np.ndarray:
        """Unique ids per position, int64 [P]."""
        return np.diff(self.offsets)

    def padded(self, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64 [P, w], counts int32 [P, w], logprobs float32 [P, w]) with w = the most
        unique ids at a position (or `width`); padding entries have count 0, id 0, log-prob 0."""
        n = self.per_position()
        w = int(n.max(initial=0)) if width is None else width
        p = self.num_positions
        ids = np.zeros((p, w), dtype=np.int64)
        counts = np.zeros((p, w), dtype=np.int32)
        lps = np.zeros((p, w), dtype=np.float32)
        if self.ids.size:
            rows = np.repeat(np.arange(p), n)
            cols = np.arange(self.ids.size) - np.repeat(self.offsets[:-1], n)
            ids[rows, cols] = self.ids
            counts[rows, cols] = self.counts
            lps[rows, cols] = self.logprobs
        return ids, counts, lps


def draws_from_samples(ids: np.ndarray, logprobs_of: np.ndarray) -> Draws:
    """Draws from the raw draws [P, N] (ids drawn at each position, with repeats) and the
    teacher log-prob of each drawn id [P, N] (same shape)."""
    p, n = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    s_ids = np.take_along_axis(ids, order, 1)
    s_lps = np.take_along_axis(logprobs_of, order, 1)
    new = np.ones((p, n), dtype=bool)
    new[:, 1:] = s_ids[:, 1:] != s_ids[:, :-1]
    starts = np.flatnonzero(new.ravel())
    flat_ids = s_ids.ravel()[starts]
    bounds = np.append(starts, p * n)
    counts = np.diff(bounds)
    per_pos = new.sum(1)
    offsets = np.zeros(p + 1, dtype=np.int64)
    np.cumsum(per_pos, out=offsets[1:])
    return Draws(
        offsets=offsets,
        ids=flat_ids.astype(np.int32),
        counts=counts.astype(np.int32),
        logprobs=s_lps.ravel()[starts].astype(np.float32),
    )


def _planes(a: np.ndarray) -> bytes:
    raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize)
    return raw.T.tobytes()


def _unplanes(blob: memoryview, count: int, dtype: np.dtype) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    raw = np.frombuffer(blob, dtype=np.uint8, count=count * size).reshape(size, count)
    return np.ascontiguousarray(raw.T).view(dtype).reshape(count)


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65_536 else np.dtype("<u4")


def encode_draws(d: Draws, *, vocab_size: int, draws: int) -> bytes:
    """One row's `draws` value (layout in the module docstring); checks what it encodes."""
    n = d.per_position()
    if n.size and n.max() > MAX_DRAWS:
        raise DrawsError(f"{int(n.max())} unique ids at a position (at most {MAX_DRAWS})")
    if d.ids.size:
        if d.ids.min() < 0 or d.ids.max() >= vocab_size:
            raise DrawsError(f"drawn id outside the vocabulary [0, {vocab_size})")
        if d.counts.min() < 1:
            raise DrawsError("a drawn id with count < 1")
        if not np.isfinite(d.logprobs).all() or d.logprobs.max() > 1e-3:
            raise DrawsError("drawn log-probs must be finite and <= 0")
    sums = np.add.reduceat(d.counts, d.offsets[:-1]) if d.ids.size else np.zeros(0)
    if n.size and (n.min() < 1 or not np.array_equal(sums, np.full(n.size, draws))):
        raise DrawsError(f"the counts of a position do not sum to draws = {draws}")
    gaps = d.ids.astype(np.int64).copy()
    if gaps.size:
        gaps[1:] -= d.ids[:-1]
        first = d.offsets[:-1][n > 0]
        gaps[first] = d.ids[first]
        later = np.ones(gaps.size, dtype=bool)
        later[first] = False
        if (gaps[later] <= 0).any():
            raise DrawsError("drawn ids must be unique and ascending within a position")
    q = np.clip(np.rint(-d.logprobs.astype(np.float64) * DRAW_SCALE), 0, _Q_MAX)
    return b"".join(
        (
            n.astype(np.uint8).tobytes(),
            _planes(gaps.astype(_id_dtype(vocab_size))),
            d.counts.astype(np.uint8).tobytes(),
            _planes(q.astype("<u2")),
        )
    )


def decode_draws(blob: bytes, positions: int, *, vocab_size: int, draws: int) -> Draws:
    """The inverse of `encode_draws`; DrawsError on any inconsistency."""
    view = memoryview(blob)
    if len(view) < positions:
        raise DrawsError(f"draws value of {len(view)} bytes for {positions} positions")
    n = np.frombuffer(view, dtype=np.uint8, count=positions).astype(np.int64)
    m = int(n.sum())
    id_dt = _id_dtype(vocab_size)
    want = positions + m * (id_dt.itemsize + 1 + 2)
    if len(view) != want:
        raise DrawsError(f"draws value of {len(view)} bytes, expected {want}")
    at = positions
    gaps = _unplanes(view[at:], m, id_dt).astype(np.int64)
    at += m * id_dt.itemsize
    counts = np.frombuffer(view[at:], dtype=np.uint8, count=m).astype(np.int32)
    at += m
    q = _unplanes(view[at:], m, np.dtype("<u2")).astype(np.float64)
    offsets = np.zeros(positions + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    # Undo the gaps: a running sum restarted at each position's first entry.
    total = np.cumsum(gaps)
    nz = n > 0
    first = offsets[:-1][nz]
    ids = total - np.repeat(total[first] - gaps[first], n[nz]) if m else total
    out = Draws(offsets, ids.astype(np.int32), counts, (-q / DRAW_SCALE).astype(np.float32))
    if n.size and n.min() < 1:
        raise DrawsError("a position without draws")
    if m and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DrawsError(f"drawn id outside the vocabulary [0, {vocab_size})")
    if m and counts.min() < 1:
        raise DrawsError("a drawn id with count 0")
    if m and not np.array_equal(np.add.reduceat(counts, offsets[:-1]), np.full(positions, draws)):
        raise DrawsError(f"the counts of a position do not sum to draws = {draws}")
    return out


def encode_tail(tail_logz: np.ndarray) -> bytes:
    """One row's `tail_logz` value: float16 [P, G], byte planes."""
    t = np.asarray(tail_logz, dtype=np.float32)
    if np.isnan(t).any():
        raise DrawsError("NaN in tail_logz")
    return _planes(t.astype("<f2").ravel())


def decode_tail(blob: bytes, positions: int, grid: int) -> np.ndarray:
    """float32 [P, G] from one `tail_logz` value."""
    count = positions * grid
    if len(blob) != 2 * count:
        raise DrawsError(f"tail_logz value of {len(blob)} bytes, expected {2 * count}")
    out = _unplanes(memoryview(blob), count, np.dtype("<f2")).astype(np.float32)
    if np.isnan(out).any():
        raise DrawsError("NaN in tail_logz")
    return out.reshape(positions, grid)
