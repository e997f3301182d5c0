"""The codec's documented error bounds on realistic teacher-shaped values, and proof that the
numba decoder really runs where it is compared with the numpy one."""

from __future__ import annotations

import numpy as np

from tests.test_storage_codec import _encoded
from todi.storage import _jit
from todi.storage.codec import RansQ32, RowBlock


def _teacher_block(n_rows: int = 6, positions: int = 200, k: int = 32, vocab: int = 49_152):
    rng = np.random.default_rng(11)
    ids = [
        np.stack([rng.permutation(vocab)[:k] for _ in range(positions)]).astype(np.int32)
        for _ in range(n_rows)
    ]
    lps = [
        (-np.cumsum(rng.exponential(0.7, (positions, k)), axis=1)).astype(np.float32)
        for _ in range(n_rows)
    ]
    block = RowBlock(
        [f"r{i}" for i in range(n_rows)],
        [rng.integers(0, vocab, positions + 1).astype(np.int32) for _ in range(n_rows)],
        np.zeros(n_rows, np.int64),
        np.full(n_rows, positions, np.int64),
    )
    return ids, lps, block, vocab, k


def test_mean_and_max_error_bounds() -> None:
    """Quantized to 1/32 nat: max error <= 1/64, mean about 1/128 (docs/limits.md)."""
    ids, lps, block, vocab, k = _teacher_block()
    codec = RansQ32()
    cols = codec.encode_rows(ids, lps, block, vocab_size=vocab, top_k=k)
    got_ids, got_lps = codec.decode_rows(cols, block, vocab_size=vocab, top_k=k)
    err = np.concatenate([np.abs(a - b).ravel() for a, b in zip(got_lps, lps, strict=True)])
    assert all(np.array_equal(a, b) for a, b in zip(got_ids, ids, strict=True))
    assert err.max() <= 1 / 64 + 1e-6, err.max()
    assert 0.8 / 128 <= err.mean() <= 1.2 / 128, err.mean()


def test_numba_decoder_runs_and_equals_numpy() -> None:
    assert _jit.ready(), "numba is a dependency: its kernels must compile here"
    codec, cols, block = _encoded()
    codec.jit = True
    jit_ids, jit_lps = codec.decode_rows(cols, block, vocab_size=3000, top_k=16)
    decode_lanes, symbol_values = _jit.kernels()
    # The compiled dispatchers have been called (a signature is compiled per call type).
    assert decode_lanes.signatures and symbol_values.signatures
    codec.jit = False
    np_ids, np_lps = codec.decode_rows(cols, block, vocab_size=3000, top_k=16)
    for a, b in zip(jit_ids, np_ids, strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(jit_lps, np_lps, strict=True):
        assert np.array_equal(a, b)
