"""Comparing teacher outputs computed in different batch shapes or on different CPUs.

Two float computations of the same log-prob (AMX, AVX-512 and AVX2 kernels; a batch of
another shape) agree to a few ULP, not bit for bit. So two top-k lists of the same position
may order two ids differently where their log-probs tie to within a few ULP, and nowhere else.
"""

from __future__ import annotations

import numpy as np

# float32 ULP at |x| < 32 is <= 3.8e-6: 2e-5 nat is several ULP.
TIE_NAT = 2e-5


def assert_same_ranking(ids_a, lps_a, ids_b, lps_b, *, tol: float = TIE_NAT) -> int:
    """Top-k ids [..., k] of two computations are equal, except at ranks where the log-prob
    ties (within `tol`) with a neighbouring rank, or at the last rank where both sides hold
    the same value (a tie with the unseen rank k + 1). Returns the number of such swaps."""
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    lps_a = np.asarray(lps_a, dtype=np.float64)
    lps_b = np.asarray(lps_b, dtype=np.float64)
    assert ids_a.shape == ids_b.shape, (ids_a.shape, ids_b.shape)
    differ = ids_a != ids_b
    if not differ.any():
        return 0
    gap = np.abs(np.diff(lps_a, axis=-1)) <= tol
    tied = np.zeros_like(differ)
    tied[..., :-1] |= gap
    tied[..., 1:] |= gap
    tied[..., -1] |= np.abs(lps_a[..., -1] - lps_b[..., -1]) <= tol
    bad = differ & ~tied
    assert not bad.any(), f"{int(bad.sum())} top-k ids differ away from a log-prob tie"
    return int(differ.sum())
