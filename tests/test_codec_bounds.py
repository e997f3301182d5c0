"""The codec's documented error bounds on realistic teacher-shaped values, and proof that the
numba decoder really runs where it is compared with the numpy one."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_storage_codec import _encoded
from todi.storage import _jit
from todi.storage.codec import RansQ32, RowBlock
from todi.storage.codec_match import RansQ32Match


def _teacher_block(n_rows: int = 6, positions: int = 200, k: int = 32, vocab: int = 49_152):
    rng = np.random.default_rng(11)
    ids = [
        np.stack([rng.permutation(vocab)[:k] for _ in range(positions)]).astype(np.int32)
        for _ in range(n_rows)
    ]
    # a few recurring tokens whose lists recur half the time (rans-q32-v2's matches)
    inputs = [rng.integers(0, 12, positions + 1).astype(np.int32) for _ in range(n_rows)]
    for r in range(n_rows):
        alike = ids[r][:12][inputs[r][:positions]]
        ids[r] = np.where(rng.random((positions, 1)) < 0.5, alike, ids[r])
    lps = [
        (-np.cumsum(rng.exponential(0.7, (positions, k)), axis=1)).astype(np.float32)
        for _ in range(n_rows)
    ]
    block = RowBlock(
        [f"r{i}" for i in range(n_rows)],
        inputs,
        np.zeros(n_rows, np.int64),
        np.full(n_rows, positions, np.int64),
    )
    return ids, lps, block, vocab, k


@pytest.mark.parametrize("codec_cls", [RansQ32, RansQ32Match])
def test_mean_and_max_error_bounds(codec_cls) -> None:
    """Quantized to 1/32 nat: max error <= 1/64, mean about 1/128 (docs/limits.md)."""
    ids, lps, block, vocab, k = _teacher_block()
    codec = codec_cls()
    cols = codec.encode_rows(ids, lps, block, vocab_size=vocab, top_k=k)
    got_ids, got_lps = codec.decode_rows(cols, block, vocab_size=vocab, top_k=k)
    err = np.concatenate([np.abs(a - b).ravel() for a, b in zip(got_lps, lps, strict=True)])
    assert all(np.array_equal(a, b) for a, b in zip(got_ids, ids, strict=True))
    assert err.max() <= 1 / 64 + 1e-6, err.max()
    assert 0.8 / 128 <= err.mean() <= 1.2 / 128, err.mean()


@pytest.mark.parametrize("codec_cls", [RansQ32, RansQ32Match])
def test_numba_decoder_runs_and_equals_numpy(codec_cls) -> None:
    assert _jit.ready(), "numba is a dependency: its kernels must compile here"
    codec, cols, block = _encoded(codec_cls=codec_cls, distinct_tokens=4)
    codec.jit = True
    jit_ids, jit_lps = codec.decode_rows(cols, block, vocab_size=3000, top_k=16)
    decode_lanes, symbol_values = _jit.kernels()
    # The compiled dispatchers have been called (a signature is compiled per call type).
    assert decode_lanes.signatures and symbol_values.signatures
    if codec_cls is RansQ32Match:  # matches were decoded, by the compiled copier
        assert _jit.match_kernel().signatures
    codec.jit = False
    np_ids, np_lps = codec.decode_rows(cols, block, vocab_size=3000, top_k=16)
    for a, b in zip(jit_ids, np_ids, strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(jit_lps, np_lps, strict=True):
        assert np.array_equal(a, b)
