"""The top-k codecs on their own: round-trip properties (hypothesis), both decoders of the
rANS codec, corruption, the entropy-coding primitives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from todi.storage import rans
from todi.storage.codec import (
    LOGPROB_FLOOR,
    CodecError,
    RansQ32,
    RowBlock,
    ShardTable,
    from_symbols,
    get_codec,
    known_codecs,
    to_symbols,
)
from todi.storage.codec_match import MATCH, RansQ32Match

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def blocks(draw, codec_name: str):
    """Rows of top-k blocks with nasty values: extreme log-probs, ties, duplicates, big vocab."""
    vocab = draw(st.sampled_from([1, 2, 50, 1000, 65_536, 65_537, 70_000, (1 << 17) + 3]))
    k = draw(st.integers(1, 70))
    n_rows = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    style = draw(
        st.sampled_from(["teacher", "ties", "extreme", "flat", "positive-noise", "context"])
    )
    rng = np.random.default_rng(seed)
    ids, lps, inputs, prompts = [], [], [], []
    for _ in range(n_rows):
        length = int(rng.integers(2, 40))
        prompt = int(rng.integers(0, length))
        positions = length - 1 - max(prompt - 1, 0)
        if style == "ties":
            v = -rng.integers(0, 4, (positions, k)) * 0.25
        elif style == "extreme":
            v = -rng.choice([0.0, 1e-9, 0.5, 30.0, 1e4, 1e9], (positions, k))
        elif style == "flat":
            v = np.full((positions, k), -np.log(max(vocab, k)))
        elif style == "positive-noise":  # engines round log(1) to a hair above 0
            v = rng.uniform(-1e-4, 1e-3, (positions, k))
        else:
            v = -np.cumsum(rng.exponential(0.7, (positions, k)), axis=1)
        v = -np.sort(-v, axis=1)  # rank order: descending
        if vocab >= k and rng.random() < 0.7:  # distinct ids, as engines give
            t = (
                np.argsort(rng.random((positions, vocab)), axis=1)[:, :k]
                if vocab < 5000
                else (np.stack([rng.choice(vocab, k, replace=False) for _ in range(positions)]))
            )
        else:
            t = rng.integers(0, vocab, (positions, k))
        tokens = rng.integers(0, vocab, length)
        if style == "context":  # few distinct tokens, top-k lists alike after the same one
            tokens = rng.integers(0, min(vocab, 5), length)
            bases = t[rng.integers(0, max(positions, 1), 5)] if positions else t
            first = max(prompt - 1, 0)
            if positions:
                alike = bases[tokens[first : first + positions] % len(bases)]
                keep = rng.random((positions, k)) < 0.8
                t = np.where(keep, alike, t)
        if positions and rng.random() < 0.5:  # the next token is often in the top-k
            first = max(prompt - 1, 0)
            tokens[first + 1 :] = t[np.arange(positions), rng.integers(0, k, positions)]
        ids.append(t.astype(np.int32))
        lps.append(v.astype(np.float32))
        inputs.append(tokens.astype(np.int32))
        prompts.append(prompt)
    block = RowBlock(
        [f"r{i}" for i in range(n_rows)],
        inputs,
        np.array(prompts, np.int64),
        np.array([len(i) for i in ids], np.int64),
    )
    return vocab, k, ids, lps, block


def _round_trip(codec_name, vocab, k, ids, lps, block, *, jit=True):
    codec = get_codec(codec_name)
    if not isinstance(codec, RansQ32):
        cols = codec.encode_rows(ids, lps, block, vocab_size=vocab, top_k=k)
        return codec.decode_rows(cols, block, vocab_size=vocab, top_k=k)
    codec.jit = jit
    try:
        cols = codec.encode_rows(ids, lps, block, vocab_size=vocab, top_k=k)
        return codec.decode_rows(cols, block, vocab_size=vocab, top_k=k), cols
    finally:
        codec.jit = True


def _check(codec_name, ids, lps, out_ids, out_lps) -> None:
    codec = get_codec(codec_name)
    bound = codec.max_logprob_error
    for a, b, c, d in zip(ids, lps, out_ids, out_lps, strict=True):
        assert c.dtype == np.int32 and d.dtype == np.float32 and c.shape == a.shape
        assert np.array_equal(a, c)  # ids bit-exact, in the given rank order
        want = np.clip(b.astype(np.float64), codec.logprob_floor, 0.0)
        assert np.abs(want - d).max(initial=0) <= bound
        assert (d <= 0).all() and np.isfinite(d).all()


@SETTINGS
@given(data=blocks("rans-q32-v1"))
def test_rans_round_trip_property(data) -> None:
    vocab, k, ids, lps, block = data
    out, cols = _round_trip("rans-q32-v1", vocab, k, ids, lps, block)
    _check("rans-q32-v1", ids, lps, *out)
    numpy_out, numpy_cols = _round_trip("rans-q32-v1", vocab, k, ids, lps, block, jit=False)
    # the compiled and the numpy coders agree bit for bit, both ways
    assert all(cols[name].equals(numpy_cols[name]) for name in cols)
    for a, b in zip(out[0] + out[1], numpy_out[0] + numpy_out[1], strict=True):
        assert np.array_equal(a, b)


@SETTINGS
@given(data=blocks("rans-q32-v2"))
def test_rans_v2_round_trip_property(data) -> None:
    vocab, k, ids, lps, block = data
    out, cols = _round_trip("rans-q32-v2", vocab, k, ids, lps, block)
    _check("rans-q32-v2", ids, lps, *out)
    numpy_out, numpy_cols = _round_trip("rans-q32-v2", vocab, k, ids, lps, block, jit=False)
    assert all(cols[name].equals(numpy_cols[name]) for name in cols)
    for a, b in zip(out[0] + out[1], numpy_out[0] + numpy_out[1], strict=True):
        assert np.array_equal(a, b)
    # the same quantized log-probs as rans-q32-v1
    other, _ = _round_trip("rans-q32-v1", vocab, k, ids, lps, block)
    for a, b in zip(out[1], other[1], strict=True):
        assert np.array_equal(a, b)


def test_match_sources() -> None:
    """Sources: the latest same two-token context first, then the latest same tokens."""
    from todi.storage.codec_match import match_sources

    # stored positions' current tokens: 5 7 5 7 5 9 5   (row 0, no prompt)
    #                                   3 3 3           (row 1, prompt 2: input 8 3 3 3 ...)
    row0 = np.array([5, 7, 5, 7, 5, 9, 5, 1], np.int32)
    row1 = np.array([8, 3, 3, 3, 4], np.int32)
    block = RowBlock(["a", "b"], [row0, row1], np.array([0, 2]), np.array([7, 3]))
    src = match_sources(block, [0, 1]).tolist()
    assert src[:7] == [
        [-1, -1], [-1, -1], [0, -1],  # p2: token 5 seen at 0; no (7, 5) before
        [1, -1], [2, 0],  # p4: (7, 5) at 2, then the other 5 (0)
        [-1, -1], [4, 2],  # p6: (9, 5) never; latest 5s: 4, 2
    ]  # fmt: skip
    assert src[7:] == [[-1, -1], [7, -1], [8, 7]]  # row 1 indices follow row 0's
    assert match_sources(block, [1]).tolist() == [[-1, -1], [0, -1], [1, 0]]


def test_v2_codes_repeated_contexts_smaller() -> None:
    """Lists that repeat after the same token: v2 copies them, v1 cannot."""
    rng = np.random.default_rng(4)
    vocab, k, positions = 20_000, 32, 300
    bases = np.stack([rng.permutation(vocab)[:k] for _ in range(6)]).astype(np.int32)
    tokens = rng.integers(0, 6, positions + 1).astype(np.int32)
    ids = bases[tokens[:-1]]
    ids[:, -4:] = rng.integers(0, vocab, (positions, 4))
    lps = -np.sort(rng.exponential(1.0, (positions, k)), axis=1).astype(np.float32)
    block = RowBlock(["r"], [tokens], np.zeros(1, np.int64), np.array([positions]))
    size = {}
    for name in ("rans-q32-v1", "rans-q32-v2"):
        codec = get_codec(name)
        cols = codec.encode_rows([ids], [lps], block, vocab_size=vocab, top_k=k)
        size[name] = len(cols["topk_code"][0].as_py())
        out_ids, _ = codec.decode_rows(cols, block, vocab_size=vocab, top_k=k)
        assert np.array_equal(out_ids[0], ids)
    assert size["rans-q32-v2"] < 0.8 * size["rans-q32-v1"], size


@SETTINGS
@given(data=blocks("qdelta32-planes-v1"))
def test_legacy_round_trip_property(data) -> None:
    vocab, k, ids, lps, block = data
    _check(
        "qdelta32-planes-v1",
        ids,
        lps,
        *_round_trip("qdelta32-planes-v1", vocab, k, ids, lps, block),
    )


def test_unsorted_rows_come_back_in_rank_order() -> None:
    rng = np.random.default_rng(0)
    ids = rng.permutation(100)[:10].reshape(1, 10).astype(np.int32)
    lps = -rng.random((1, 10)).astype(np.float32) * 5
    codec = get_codec("rans-q32-v1")
    out_ids, out_lps = codec.decode(*codec.encode(ids, lps, 100), 1, 10, 100)
    order = np.argsort(-lps[0], kind="stable")
    assert np.array_equal(out_ids[0], ids[0, order])
    assert (np.diff(out_lps[0]) <= 0).all()


@pytest.mark.parametrize("name", known_codecs())
def test_single_block_api(name: str) -> None:
    """encode / decode of one [P, k] block: what an online teacher uses to quantize targets."""
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(5000)[:16] for _ in range(30)]).astype(np.int32)
    lps = -np.sort(rng.exponential(2.0, (30, 16)), axis=1).astype(np.float32)
    codec = get_codec(name)
    a, b = codec.encode(ids, lps, 5000)
    assert isinstance(a, bytes) and isinstance(b, bytes)
    out_ids, out_lps = codec.decode(a, b, 30, 16, 5000)
    assert np.array_equal(out_ids, ids)
    assert np.abs(out_lps - lps).max() <= codec.max_logprob_error


def test_floor_for_absurd_logprobs() -> None:
    ids = np.array([[3, 1]], np.int32)
    lps = np.array([[-1e9, -1e30]], np.float32)
    codec = get_codec("rans-q32-v1")
    _, out = codec.decode(*codec.encode(ids, lps, 10), 1, 2, 10)
    assert np.allclose(out, LOGPROB_FLOOR, rtol=1e-6)


def _encoded(n_rows=3, positions=70, k=16, vocab=3000, codec_cls=RansQ32, distinct_tokens=None):
    rng = np.random.default_rng(2)
    ids = [np.stack([rng.permutation(vocab)[:k] for _ in range(positions)]).astype(np.int32)]
    ids = ids * n_rows
    lps = [-np.sort(rng.exponential(1.0, (positions, k)), axis=1).astype(np.float32)] * n_rows
    block = RowBlock(
        [f"r{i}" for i in range(n_rows)],
        [rng.integers(0, distinct_tokens or vocab, positions + 1).astype(np.int32)] * n_rows,
        np.zeros(n_rows, np.int64),
        np.full(n_rows, positions, np.int64),
    )
    if distinct_tokens:  # the same list after the same token: rans-q32-v2 matches
        ids = [ids[0][block.input_ids[0][:positions]]] * n_rows
    codec = codec_cls()
    return codec, codec.encode_rows(ids, lps, block, vocab_size=vocab, top_k=k), block


@pytest.mark.parametrize("name", ["rans-q32-v1", "rans-q32-v2"])
@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("damage", ["truncate", "state", "word", "raw-length", "table"])
def test_damaged_blocks_are_refused(name: str, jit: bool, damage: str) -> None:
    if name == "rans-q32-v1":
        codec, cols, block = _encoded()
    else:
        codec, cols, block = _encoded(codec_cls=RansQ32Match, distinct_tokens=4)
    codec.jit = jit
    flips = {"state": (3, 0x40), "word": (40, 0x01)}
    _assert_damage_refused(codec, cols, block, damage, flips, vocab_size=3000, top_k=16)


def _assert_damage_refused(codec, cols, block, damage: str, flips, **shape) -> None:
    """Damage the second row's code (truncate, flip a byte of `flips[damage]`, append a byte)
    or every row's table: decoding must raise a CodecError naming the first bad row."""
    code = [bytearray(b) for b in cols["topk_code"].to_pylist()]
    table = cols["topk_table"].to_pylist()
    if damage == "truncate":
        code[1] = code[1][: len(code[1]) // 2]
    elif damage in flips:
        at, bit = flips[damage]
        code[1][at] ^= bit
    elif damage == "raw-length":
        code[1] += b"\0"
    else:
        table = [b"\1\2\3" + t[3:] for t in table]
    damaged = {"topk_code": pa.array([bytes(b) for b in code]), "topk_table": pa.array(table)}
    with pytest.raises(CodecError) as err:
        codec.decode_rows(damaged, block, **shape)
    assert err.value.row == (0 if damage == "table" else 1)


@pytest.mark.parametrize("jit", [True, False])
def test_v2_match_without_source_is_refused(jit: bool) -> None:
    """A match value that names a source the position does not have: a clear CodecError
    (rANS and raw bits intact, so only the id stage can notice)."""
    codec, cols, block = _encoded(codec_cls=RansQ32Match, distinct_tokens=4)
    codec.jit = jit
    table = codec.table(cols["topk_table"][0].as_py())
    num = np.zeros((3 * 70, 16), np.int64)
    num[0, 0] = MATCH  # a row's first position has no earlier position to copy from
    with pytest.raises(CodecError, match="match without a source") as err:
        codec._ids(num, table, block, np.arange(3), np.array([0, 70, 140]))
    assert err.value.row == 0


def test_table_round_trip_and_shape_check() -> None:
    rng = np.random.default_rng(3)
    ids = rng.zipf(1.3, (500, 8)) % 7000
    table = ShardTable.from_ids(ids, 7000, 8)
    again = ShardTable.from_bytes(table.to_bytes())
    assert np.array_equal(again.perm, table.perm)
    assert np.array_equal(again.tables.freqs, table.tables.freqs)
    assert sorted(table.perm.tolist()) == list(range(7000))
    counts = np.bincount(ids.ravel(), minlength=7000)
    assert counts[table.perm[0]] == counts.max()  # the most frequent id is number 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, (1 << 31) - 1), max_size=200))
def test_symbols_round_trip(values) -> None:
    v = np.array(values, dtype=np.int64)
    sym, nbits, raw = to_symbols(v)
    assert (sym < 448).all() and (raw < (np.int64(1) << nbits)).all()
    assert np.array_equal(from_symbols(sym, raw), v)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 32), st.integers(0, 2**32 - 1)), max_size=300))
def test_bit_packing_round_trip(fields) -> None:
    widths = np.array([w for w, _ in fields], dtype=np.int64)
    values = np.array([v & ((1 << w) - 1) for w, v in fields], dtype=np.uint64)
    blob = rans.pack_bits(values, widths)
    assert len(blob) == (int(widths.sum()) + 7) // 8
    offsets = np.cumsum(widths) - widths
    assert np.array_equal(rans.unpack_bits(blob, offsets, widths), values)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 10**6), min_size=5, max_size=5), min_size=1, max_size=4))
def test_frequency_normalization(rows) -> None:
    counts = np.array(rows, dtype=np.int64)
    freqs = rans.normalize_counts(counts)
    assert (freqs.sum(axis=1) == rans.M).all()
    assert ((freqs > 0) | (counts == 0) | (counts.sum(axis=1, keepdims=True) == 0)).all()


# ---------------------------------------------------------------------------- ans-q32-c1
# The same values as rans-q32-v1, coded by the constriction library (bench/bench_codec.py).


@SETTINGS
@given(data=blocks("ans-q32-c1"))
def test_constriction_round_trip_property(data) -> None:
    vocab, k, ids, lps, block = data
    _check("ans-q32-c1", ids, lps, *_round_trip("ans-q32-c1", vocab, k, ids, lps, block))
    # the same quantized values as rans-q32-v1, so a set can be re-coded either way
    other, _ = _round_trip("rans-q32-v1", vocab, k, ids, lps, block)
    mine = _round_trip("ans-q32-c1", vocab, k, ids, lps, block)
    for a, b in zip(mine[0] + mine[1], other[0] + other[1], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "count", "raw-length", "table"])
def test_constriction_damaged_blocks_are_refused(damage: str) -> None:
    from todi.storage.codec_constriction import AnsQ32Constriction

    rng = np.random.default_rng(2)
    n_rows, positions, k, vocab = 3, 70, 16, 3000
    ids = [np.stack([rng.permutation(vocab)[:k] for _ in range(positions)]).astype(np.int32)]
    lps = [-np.sort(rng.exponential(1.0, (positions, k)), axis=1).astype(np.float32)]
    block = RowBlock(
        [f"r{i}" for i in range(n_rows)],
        [rng.integers(0, vocab, positions + 1).astype(np.int32)] * n_rows,
        np.zeros(n_rows, np.int64),
        np.full(n_rows, positions, np.int64),
    )
    codec = AnsQ32Constriction()
    cols = codec.encode_rows(ids * n_rows, lps * n_rows, block, vocab_size=vocab, top_k=k)
    _assert_damage_refused(
        AnsQ32Constriction(), cols, block, damage, {"count": (0, 0x40)}, vocab_size=vocab, top_k=k
    )
