"""Targets beyond top-k (#18), capture and storage side: draws (RS-KD), the hybrid, the
re-tempering statistics, the format-2 columns, and what the trainer's batch gets from them.

Synthetic distributions check the math exactly; the real SmolLM2 teacher (hf engine) checks the
capture: a T = 1 capture re-tempered to T = 2 equals the teacher at T = 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from todi.services.targets import TargetRequest, concat_targets, select, sequence_generator
from todi.storage import (
    Sample,
    ShardFormatError,
    ShardSetMetadata,
    ShardSetWriter,
    collate,
    expected_positions,
    first_position,
    open_shard_set,
    shard_schema,
    verify_shard_set,
)
from todi.storage.draws import Draws, DrawsError, decode_draws, draws_from_samples, encode_draws
from todi.storage.retemper import sample_targets, temperature_index

V = 300


def _logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prior = -1.2 * torch.log1p(torch.arange(vocab, dtype=torch.float64))
    return prior + 2.0 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)


def _meta(**kw) -> ShardSetMetadata:
    base = {
        "teacher_model": "synthetic",
        "teacher_fingerprint": "sha256:t",
        "tokenizer_sha256": "sha256:tok",
        "vocab_size": V,
        "top_k": 8,
        "temperature": 1.0,
        "logprobs_mode": "log_softmax_fp32",
        "backend": "hf",
    }
    return ShardSetMetadata(**(base | kw))


def _samples(request: TargetRequest, n: int = 6, temperature: float = 1.0, seed: int = 0):
    """Rows of random lengths whose targets `select` chose from synthetic logits."""
    rng = np.random.default_rng(seed)
    out, logits_of = [], {}
    for i in range(n):
        length = int(rng.integers(4, 30))
        tokens = rng.integers(0, V, length).astype(np.int32)
        prompt_len = int(rng.integers(0, length - 1)) if i % 2 else 0
        positions = expected_positions(length, prompt_len)
        z = _logits(positions, seed=100 * seed + i)
        lp = torch.log_softmax(z / temperature, -1).float()
        sid = f"row{i}"
        t = select(lp, request, temperature=temperature, generator=sequence_generator(7, sid))
        out.append(Sample(sid, tokens, prompt_len, t.topk_ids, t.topk_logprobs, t.draws,
                          t.tail_logz))  # fmt: skip
        logits_of[sid] = z
    return out, logits_of


# ------------------------------------------------------------------------------------------
# draws: the column's codec


def test_draws_round_trip_and_damage():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(V, 0.05), size=40)
    ids = np.stack([rng.choice(V, 50, p=row) for row in p])
    lps = np.log(np.take_along_axis(p, ids, 1))
    d = draws_from_samples(ids, lps)
    assert np.array_equal(np.add.reduceat(d.counts, d.offsets[:-1]), np.full(40, 50))
    blob = encode_draws(d, vocab_size=V, draws=50)
    back = decode_draws(blob, 40, vocab_size=V, draws=50)
    assert np.array_equal(back.ids, d.ids) and np.array_equal(back.counts, d.counts)
    assert np.array_equal(back.offsets, d.offsets)
    assert np.abs(back.logprobs - d.logprobs).max() <= 1 / 64 + 1e-6
    with pytest.raises(DrawsError, match="bytes"):
        decode_draws(blob[:-1], 40, vocab_size=V, draws=50)
    with pytest.raises(DrawsError, match="sum to draws = 49"):
        decode_draws(blob, 40, vocab_size=V, draws=49)
    bad = Draws(d.offsets, d.ids.copy(), d.counts, d.logprobs)
    bad.ids[1] = bad.ids[0]  # a repeated id in a position
    with pytest.raises(DrawsError, match="unique and ascending"):
        encode_draws(bad, vocab_size=V, draws=50)
    # a vocabulary above 65,536 ids takes 32-bit gaps
    big = Draws(np.array([0, 2]), np.array([5, 100_000], np.int32), np.array([1, 1], np.int32),
                np.array([-1.0, -2.0], np.float32))  # fmt: skip
    assert decode_draws(encode_draws(big, vocab_size=152_064, draws=2), 1,
                        vocab_size=152_064, draws=2).ids.tolist() == [5, 100_000]  # fmt: skip


# ------------------------------------------------------------------------------------------
# select: what a position keeps


def test_select_topk_draws_hybrid_and_tail_statistics():
    z = _logits(12)
    lp = torch.log_softmax(z, -1).float()
    gen = sequence_generator(3, "x")
    req = TargetRequest(targets="sampled", top_k=4, draws=64, retemper=(2.0, 0.5))
    t = select(lp, req, temperature=1.0, generator=gen)
    want_lp, want_ids = torch.topk(lp, 4)
    assert np.array_equal(t.topk_ids, want_ids.numpy())
    assert np.allclose(t.topk_logprobs, want_lp.numpy())
    d = t.draws
    assert d is not None and d.num_positions == 12
    assert np.array_equal(np.add.reduceat(d.counts, d.offsets[:-1]), np.full(12, 64))
    for r in range(12):  # the hybrid draws from outside the head only
        drawn = d.ids[d.offsets[r] : d.offsets[r + 1]]
        assert not set(drawn.tolist()) & set(t.topk_ids[r].tolist())
        assert np.allclose(d.logprobs[d.offsets[r] : d.offsets[r + 1]], lp[r, drawn].numpy())
    # f_g = log sum over the ids not listed of exp(s_g * l), s_g = T_capture / T_g
    for g, temp in enumerate((2.0, 0.5)):
        for r in range(12):
            listed = set(t.topk_ids[r].tolist()) | set(
                d.ids[d.offsets[r] : d.offsets[r + 1]].tolist()
            )
            rest = [v for v in range(V) if v not in listed]
            want = torch.logsumexp(lp[r, rest].double() / temp, 0).item()
            assert t.tail_logz[r, g] == pytest.approx(want, abs=1e-4)
    # same seed and sample id: the same draws; another id: others
    again = select(lp, req, temperature=1.0, generator=sequence_generator(3, "x"))
    assert np.array_equal(again.draws.ids, d.ids) and np.array_equal(again.draws.counts, d.counts)
    other = select(lp, req, temperature=1.0, generator=sequence_generator(3, "y"))
    assert not np.array_equal(other.draws.ids, d.ids)


def test_select_from_candidates_records_their_mass():
    z = _logits(5)
    lp = torch.log_softmax(z, -1).float()
    top_lp, top_ids = torch.topk(lp, 40)
    req = TargetRequest(targets="sampled", top_k=0, draws=30)
    t = select(top_lp, req, temperature=1.0, generator=sequence_generator(0, "c"),
               candidate_ids=top_ids)  # fmt: skip
    assert np.allclose(t.covered, top_lp.double().exp().sum(-1).numpy())
    assert (t.covered < 1).all()
    for r in range(5):  # drawn ids are vocabulary ids from the candidates, with their log-probs
        ids = t.draws.ids[t.draws.offsets[r] : t.draws.offsets[r + 1]]
        assert set(ids.tolist()) <= set(top_ids[r].tolist())
        assert np.allclose(t.draws.logprobs[t.draws.offsets[r] : t.draws.offsets[r + 1]],
                           lp[r, ids].numpy())  # fmt: skip


def test_concat_targets_of_row_blocks_equals_one_block():
    z = _logits(9)
    lp = torch.log_softmax(z, -1).float()
    req = TargetRequest(targets="sampled", top_k=2, draws=10, retemper=(2.0,))
    parts = [select(lp[a:b], req, temperature=1.0) for a, b in ((0, 4), (4, 9))]
    whole = concat_targets(parts, 9, req)
    assert whole.draws.num_positions == 9 and whole.tail_logz.shape == (9, 1)
    for r, (part, row) in enumerate([(parts[0], 1), (parts[1], 2)]):
        offs = part.draws.offsets
        want = part.draws.ids[offs[row] : offs[row + 1]]
        at = row + (0 if r == 0 else 4)
        assert np.array_equal(
            whole.draws.ids[whole.draws.offsets[at] : whole.draws.offsets[at + 1]], want
        )


# ------------------------------------------------------------------------------------------
# re-tempering and weights: what the trainer's batch gets


@pytest.mark.parametrize("train_t", [2.0, 0.5])
def test_topk_capture_at_t1_retempers_exactly(train_t):
    """A top-k + tail set captured at T = 1 with `retemper` gives, at T = 2 (or 0.5), the
    teacher's own log_softmax(z / T) at the k ids and its exact tail mass."""
    req = TargetRequest(targets="topk", top_k=8, retemper=(train_t,))
    samples, logits = _samples(req)
    meta = _meta(retemper_temperatures=(train_t,))
    for s in samples:
        ids, lps, w = sample_targets(s, meta, train_t)
        assert w is None
        want = torch.log_softmax(logits[s.sample_id] / train_t, -1)
        got_want = want.gather(1, torch.from_numpy(ids)).numpy()
        assert np.abs(lps - got_want).max() < 5e-3
        tail = 1 - np.exp(lps.astype(np.float64)).sum(1)
        true_tail = 1 - np.exp(got_want).sum(1)
        assert np.abs(tail - true_tail).max() < 5e-3
    assert temperature_index(meta, 1.0) is None and temperature_index(meta, train_t) == 0
    with pytest.raises(ShardFormatError, match="records exact re-tempering to"):
        temperature_index(meta, 3.0)


@pytest.mark.parametrize("head", [0, 4])
@pytest.mark.parametrize("train_t", [1.0, 2.0])
def test_sampled_weights_are_unbiased(head, train_t):
    """sum_i w_i f(i) / p_T(i) over the listed entries is an unbiased estimate of
    E_{p_T}[f] for any f: draws only and hybrid, at the capture temperature and re-tempered
    from T = 1 to T = 2 (importance weights p_T / p_1). Mean over many captures within 4
    standard errors of the exact value."""
    z = _logits(1, seed=5)
    f = torch.linspace(-2.0, 3.0, V, dtype=torch.float64) ** 2  # any function of the id
    exact = (torch.softmax(z / train_t, -1)[0] * f).sum().item()
    req = TargetRequest(targets="sampled", top_k=head, draws=50,
                        retemper=(2.0,) if train_t != 1.0 else ())  # fmt: skip
    meta = _meta(targets="sampled", top_k=head, draws=50, sample_seed=0,
                 retemper_temperatures=req.retemper)  # fmt: skip
    lp = torch.log_softmax(z, -1).float()
    est = []
    for trial in range(1500):
        t = select(lp, req, temperature=1.0, generator=sequence_generator(trial, "u"))
        s = Sample("u", np.zeros(2, np.int32), 0, t.topk_ids, t.topk_logprobs, t.draws,
                   t.tail_logz)  # fmt: skip
        ids, _, w = sample_targets(s, meta, train_t if train_t != 1.0 else None)
        est.append(float((w[0] * f.numpy()[ids[0]]).sum()))
    est = np.array(est)
    se = est.std() / np.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * se + 1e-3, (est.mean(), exact, se)


def test_collate_weights_and_format2_round_trip(tmp_path: Path):
    req = TargetRequest(targets="sampled", top_k=3, draws=20, retemper=(2.0,))
    samples, _ = _samples(req, n=9)
    meta = _meta(targets="sampled", top_k=3, draws=20, sample_seed=7,
                 retemper_temperatures=(2.0,))  # fmt: skip
    assert shard_schema(meta).names[-2:] == ["draws", "tail_logz"]
    with ShardSetWriter(tmp_path / "set", meta, positions_per_shard=40) as w:
        w.write_many(samples)
    s = open_shard_set(tmp_path / "set")
    assert s.signature.format_version == 2 and verify_shard_set(tmp_path / "set").ok
    back = {x.sample_id: x for x in s}
    for orig in samples:
        got = back[orig.sample_id]
        assert np.array_equal(got.draws.ids, orig.draws.ids)
        assert np.array_equal(got.draws.counts, orig.draws.counts)
        assert np.abs(got.tail_logz - orig.tail_logz).max() < 2e-2  # float16
    batch = collate(list(back.values()), meta=meta)
    assert batch.target_weights is not None
    mask = batch.loss_mask
    # every counted position: head weights = p, draws weights sum to the rest mass
    w = batch.target_weights[mask].double()
    head_p = batch.topk_logprobs[mask][:, :3].double().exp()
    assert torch.allclose(w[:, :3], head_p, atol=1e-6)
    assert torch.allclose(w.sum(1), torch.ones(len(w), dtype=torch.float64), atol=3e-2)
    assert (batch.target_weights[~mask] == 0).all()
    hot = collate(list(back.values()), meta=meta, temperature=2.0)
    assert hot.target_weights.shape == batch.target_weights.shape
    with pytest.raises(ShardFormatError, match="records exact re-tempering to"):
        collate(list(back.values()), meta=meta, temperature=3.0)
    with pytest.raises(ValueError, match="need the set's metadata"):
        collate(list(back.values()))


def test_format1_sets_stay_readable(tmp_path: Path):
    from tests.test_storage import make_meta, make_samples

    meta = make_meta(format_version=1)
    samples = make_samples(5)
    with ShardSetWriter(tmp_path / "v1", meta) as w:
        w.write_many(samples)
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert manifest["metadata"]["format_version"] == 1
    got = list(open_shard_set(tmp_path / "v1"))
    assert [g.sample_id for g in got] == [s.sample_id for s in samples]
    assert all(g.draws is None and g.tail_logz is None for g in got)


def test_metadata_refuses_inconsistent_targets():
    with pytest.raises(ValueError, match="sampled set needs draws"):
        _meta(targets="sampled", draws=0, sample_seed=0)
    with pytest.raises(ValueError, match="top-k set needs top_k >= 1"):
        _meta(top_k=0)
    with pytest.raises(ValueError, match="draws = 0"):
        TargetRequest(targets="topk", top_k=4, draws=3)


# ------------------------------------------------------------------------------------------
# the real teacher (hf engine, full distribution)


@pytest.fixture(scope="module")
def hf_engine(teacher_dir):
    from todi.services.backends import create_backend

    engine = create_backend("hf", teacher_dir, max_top_k=64)
    yield engine
    engine.close()


def _rows(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "rows.jsonl"
    rows = [
        {"id": f"r{i}", "prompt": f"Tell me about item number {i}.",
         "response": f"Item {i} is a small thing that people like for {i + 2} reasons."}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_real_teacher_t1_capture_retempered_equals_t2_capture(hf_engine, tmp_path: Path):
    """One capture at T = 1 with --retemper 2 trains at T = 2 exactly: the re-tempered top-k
    equals a T = 2 capture's (same ids, log-probs within the codec's rounding), and so does
    the tail mass."""
    from todi.services.config import JobSpec
    from todi.services.precompute import run_precompute

    data = _rows(tmp_path)
    one = JobSpec(dataset=str(data), out=str(tmp_path / "t1"), top_k=16, temperature=1.0,
                  retemper=[2.0])  # fmt: skip
    two = JobSpec(dataset=str(data), out=str(tmp_path / "t2"), top_k=16, temperature=2.0)
    assert run_precompute(one, hf_engine).state == "succeeded"
    assert run_precompute(two, hf_engine).state == "succeeded"
    s1, s2 = open_shard_set(one.out), open_shard_set(two.out)
    assert s1.signature.retemper_temperatures == (2.0,)
    b1 = collate(sorted(s1, key=lambda s: s.sample_id), meta=s1.signature, temperature=2.0)
    b2 = collate(sorted(s2, key=lambda s: s.sample_id), meta=s2.signature)
    m = b1.loss_mask
    assert torch.equal(b1.topk_ids[m][:, :8], b2.topk_ids[m][:, :8])
    assert (b1.topk_logprobs[m] - b2.topk_logprobs[m]).abs().max() < 0.05
    tail1 = 1 - b1.topk_logprobs[m].double().exp().sum(-1)
    tail2 = 1 - b2.topk_logprobs[m].double().exp().sum(-1)
    assert (tail1 - tail2).abs().max() < 0.02


def test_real_teacher_sampled_capture_is_reproducible(hf_engine, tmp_path: Path):
    """The same sampled job twice: byte-identical shards; the manifest records the seed,
    the draws and full coverage (the hf engine draws from the whole vocabulary)."""
    from todi.services.config import JobSpec
    from todi.services.precompute import run_precompute

    data = _rows(tmp_path)
    digests = []
    for out in ("a", "b"):
        spec = JobSpec(dataset=str(data), out=str(tmp_path / out), top_k=0, targets="sampled",
                       draws=32, sample_seed=11, positions_per_shard=64)  # fmt: skip
        assert run_precompute(spec, hf_engine).state == "succeeded"
        files = sorted((tmp_path / out).glob("*.parquet"))
        digests.append(sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files))
    assert len(digests[0]) > 1 and digests[0] == digests[1]
    s = open_shard_set(tmp_path / "a")
    sig = s.signature
    assert (sig.targets, sig.draws, sig.sample_seed, sig.candidates) == ("sampled", 32, 11, None)
    cov = s.manifest.job["coverage"]
    assert cov["positions"] == s.num_positions and cov["mean"] == pytest.approx(1.0, abs=1e-5)
    for sample in s:
        assert sample.topk_ids.shape == (sample.num_positions, 0)
        assert sample.draws.num_positions == sample.num_positions
        assert first_position(sample.prompt_len) == sample.first_position


def test_sampled_set_exports_to_axolotl_columns(tmp_path: Path):
    """A sampled set exports its listed ids with log(w) (RS-KD's sparse target for draws only;
    head p and weighted draws for the hybrid), mask 1 exactly where w > 0; only the set's own
    or recorded temperatures."""
    import datasets

    from todi.storage.export import ExportError, export_hf_dataset

    req = TargetRequest(targets="sampled", top_k=2, draws=10)
    samples, _ = _samples(req, n=4)
    meta = _meta(targets="sampled", top_k=2, draws=10, sample_seed=7)
    with ShardSetWriter(tmp_path / "set", meta) as w:
        w.write_many(samples)
    info = export_hf_dataset(str(tmp_path / "set"), tmp_path / "ax")
    assert info["targets"] == "sampled" and info["renormalized_topk"] is False
    ds = datasets.load_from_disk(str(tmp_path / "ax"))
    back = {s.sample_id: s for s in open_shard_set(tmp_path / "set")}
    for row, sid in zip(ds, [s.sample_id for s in open_shard_set(tmp_path / "set")], strict=True):
        s = back[sid]
        ids, _, w = sample_targets(s, meta)
        first, n = s.first_position, s.num_positions
        got_ids = np.asarray(row["target_token_ids"])[first : first + n]
        got_lp = np.asarray(row["target_logprobs"])[first : first + n]
        mask = np.asarray(row["target_mask"])[first : first + n]
        assert np.array_equal(mask, (w > 0).astype(np.int8))
        assert np.array_equal(got_ids[w > 0], ids[w > 0])
        assert np.allclose(np.exp(got_lp[w > 0]), w[w > 0], rtol=1e-5)
        assert np.asarray(row["target_mask"])[:first].sum() == 0
    with pytest.raises(ExportError, match="--temperature 2: the shard set was captured"):
        export_hf_dataset(str(tmp_path / "set"), tmp_path / "ax2", temperature=2.0)
