"""The divergence library (trainer/divergences.py, and the chunked engine trainer/chunked.py)
against docs/method.md: golden values, gradients, the sparse (top-k + tail) form, and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from todi.trainer.chunked import reference_sparse_divergence, sparse_divergence
from todi.trainer.divergences import (
    KINDS,
    TEACHER_TAIL_FLOOR,
    dense_divergence,
    outcome_divergence,
    teacher_tail_logprob,
)

F64 = torch.float64
V1_TEACHER = [2.0, 1.0, 0.5, -1.0, -2.0]
V1_STUDENT = [1.5, 1.2, 0.3, -0.5, -1.5]
V2_TEACHER = [5.0, 1.0, 0.0, -1.0, -3.0]
V2_STUDENT = [0.0, 0.0, 0.0, 0.0, 0.0]
TOP2 = [0, 1]

# (teacher, student, kind, beta, T, value) from docs/method.md, "Golden values".
DENSE_GOLDEN = [
    (V1_TEACHER, V1_STUDENT, "fkl", 1.0, 1.0, 0.0578263),
    (V1_TEACHER, V1_STUDENT, "rkl", 1.0, 1.0, 0.0621026),
    (V1_TEACHER, V1_STUDENT, "todi", 1.0, 1.0, 0.119929),
    (V1_TEACHER, V1_STUDENT, "todi", 0.5, 1.0, 0.0903488),
    (V1_TEACHER, V1_STUDENT, "todi", 2.0, 1.0, 0.174159),
    (V1_TEACHER, V1_STUDENT, "js", 1.0, 1.0, 0.0148575),
    (V1_TEACHER, V1_STUDENT, "tvd", 1.0, 1.0, 0.153725),
    (V1_TEACHER, V1_STUDENT, "fkl", 1.0, 2.0, 0.0181697),
    (V1_TEACHER, V1_STUDENT, "rkl", 1.0, 2.0, 0.0184461),
    (V1_TEACHER, V1_STUDENT, "todi", 1.0, 2.0, 0.0366158),
    (V2_TEACHER, V2_STUDENT, "fkl", 1.0, 1.0, 1.46082),
    (V2_TEACHER, V2_STUDENT, "rkl", 1.0, 1.0, 3.01805),
    (V2_TEACHER, V2_STUDENT, "todi", 1.0, 1.0, 4.47887),
    (V2_TEACHER, V2_STUDENT, "todi", 0.5, 1.0, 3.92697),
]
SPARSE_GOLDEN = [
    (V1_TEACHER, V1_STUDENT, "fkl", 0.0492169),
    (V1_TEACHER, V1_STUDENT, "rkl", 0.0503708),
    (V1_TEACHER, V1_STUDENT, "todi", 0.0995877),
    (V2_TEACHER, V2_STUDENT, "todi", 4.12505),
]
GRAD_GOLDEN = [
    (V1_TEACHER, V1_STUDENT, [-0.238965, 0.17051, -0.00754648, 0.0555618, 0.02044]),
    (V2_TEACHER, V2_STUDENT, [-1.46816, -0.0150943, 0.214037, 0.429348, 0.83987]),
]


def _row(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([values], dtype=dtype)


def _topk(teacher: torch.Tensor, ids: list[int], temperature: float = 1.0):
    topk_ids = torch.tensor([ids] * teacher.shape[0])
    lp = torch.log_softmax(teacher.to(F64) / temperature, dim=-1).gather(1, topk_ids)
    return topk_ids, lp.to(teacher.dtype)


def _close(actual: float, expected: float, rel: float = 2e-5) -> None:
    # The golden values carry 6 significant digits.
    assert actual == pytest.approx(expected, rel=rel, abs=1e-7)


# ------------------------------------------------------------------ golden values (docs/method.md)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("teacher", "student", "kind", "beta", "temp", "golden"), DENSE_GOLDEN)
def test_dense_golden_values(teacher, student, kind, beta, temp, golden, dtype):
    out = dense_divergence(
        kind, _row(student, dtype), _row(teacher, dtype), beta=beta, temperature=temp
    )
    assert out.shape == (1,) and out.dtype == dtype
    _close(float(out), golden)


@pytest.mark.parametrize(
    ("teacher", "student", "kind", "beta", "temp", "golden"),
    [case for case in DENSE_GOLDEN if case[0] == V2_TEACHER],  # V2's logits are exact in bf16
)
def test_dense_golden_values_bf16_inputs_float32_math(teacher, student, kind, beta, temp, golden):
    bf16 = torch.bfloat16
    out = dense_divergence(kind, _row(student, bf16), _row(teacher, bf16), beta=beta)
    assert out.dtype == torch.float32
    _close(float(out), golden)


@pytest.mark.parametrize(("teacher", "student", "kind", "golden"), SPARSE_GOLDEN)
@pytest.mark.parametrize("impl", [sparse_divergence, reference_sparse_divergence])
def test_sparse_golden_values_top2_plus_tail(teacher, student, kind, golden, impl):
    ids, lp = _topk(_row(teacher), TOP2)
    _close(float(impl(kind, _row(student), ids, lp)), golden)


@pytest.mark.parametrize(("teacher", "student", "golden"), GRAD_GOLDEN)
@pytest.mark.parametrize("form", ["dense", "sparse_k_eq_v"])
def test_todi_golden_gradients(teacher, student, golden, form):
    z = _row(student).requires_grad_(True)
    t = _row(teacher)
    if form == "dense":
        loss = dense_divergence("todi", z, t)
    else:  # k = V: the tail bucket is empty and the sparse form is the dense one
        ids, lp = _topk(t, [0, 1, 2, 3, 4])
        loss = sparse_divergence("todi", z, ids, lp)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    torch.testing.assert_close(grad[0], torch.tensor(golden), rtol=2e-5, atol=2e-7)


def test_beta_one_value_is_fkl_plus_rkl_but_gradient_is_not():
    z = _row(V1_STUDENT, F64).requires_grad_(True)
    t = _row(V1_TEACHER, F64)
    todi = dense_divergence("todi", z, t)
    both = dense_divergence("fkl", z, t) + dense_divergence("rkl", z, t)
    torch.testing.assert_close(todi, both, rtol=1e-12, atol=1e-14)
    (g_todi,) = torch.autograd.grad(todi.sum(), z)
    (g_both,) = torch.autograd.grad(both.sum(), z)
    assert (g_todi - g_both).abs().max() > 1e-2


# ------------------------------------------------------------------ analytic gradients


def _analytic_todi_grad(log_p, log_q, beta, temperature, bucket=None):
    """docs/method.md: g_v = -a p/q + (1-a)(log(q/p) + 1); dL/dz_j = q_j (g_j - sum_v q_v g_v) / T.

    With `bucket` [N, V] (the outcome of each vocabulary entry) and log_p/log_q over outcomes,
    it is the coarsened form: dL/dz_j = q_j (g_{o(j)} - sum_o q_o g_o) / T, q_j per entry."""
    p, q = log_p.exp(), log_q.exp()
    a = torch.sigmoid(beta * (log_p - log_q))
    g = -a * p / q + (1 - a) * (log_q - log_p + 1)
    mean = (q * g).sum(-1, keepdim=True)
    if bucket is None:
        return q * (g - mean) / temperature
    return (g.gather(1, bucket) - mean) / temperature


def _random_pair(n, v, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, v, generator=gen, dtype=F64) * scale,
        torch.randn(n, v, generator=gen, dtype=F64) * scale,
    )


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_dense_todi_gradient_matches_detached_analytic(beta, temperature):
    student, teacher = _random_pair(6, 17, seed=int(beta * 10 + temperature * 100))
    z = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        dense_divergence("todi", z, teacher, beta=beta, temperature=temperature).sum(), z
    )
    expected = _analytic_todi_grad(
        torch.log_softmax(teacher / temperature, -1),
        torch.log_softmax(student / temperature, -1),
        beta,
        temperature,
    )
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_sparse_todi_gradient_matches_coarsened_analytic(beta, temperature, k):
    n, v = 7, 23
    student, teacher = _random_pair(n, v, seed=k)
    lp_full = torch.log_softmax(teacher / temperature, -1)
    lp_k, ids = lp_full.topk(k, dim=-1)
    z = student.clone().requires_grad_(True)
    out = sparse_divergence("todi", z, ids, lp_k, beta=beta, temperature=temperature)
    (grad,) = torch.autograd.grad(out.sum(), z, allow_unused=False)
    # Outcomes: the k ids, then the tail (index k).
    lq_full = torch.log_softmax(student / temperature, -1)
    in_top = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids, True)
    lq_tail = torch.logsumexp(lq_full.masked_fill(in_top, -math.inf), -1, keepdim=True)
    lp_tail = torch.log1p(-lp_k.exp().sum(-1, keepdim=True))
    bucket = torch.full((n, v), k).scatter_(1, ids, torch.arange(k).expand(n, k))
    g_out = _analytic_todi_grad(
        torch.cat([lp_k, lp_tail], 1),
        torch.cat([lq_full.gather(1, ids), lq_tail], 1),
        beta,
        temperature,
        bucket=bucket,
    )
    torch.testing.assert_close(grad, lq_full.exp() * g_out, rtol=1e-9, atol=1e-12)


def _todi_not_detached(log_p, log_q, beta):
    p, q = log_p.exp(), log_q.exp()
    r = log_p - log_q
    a = torch.sigmoid(beta * r)  # the bug: the weight carries gradient
    return (a * p * r - (1 - a) * q * r).sum(-1)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_gradient_fails_if_alpha_were_not_detached(beta):
    student, teacher = _random_pair(5, 11, seed=3)
    z = student.clone().requires_grad_(True)
    lp = torch.log_softmax(teacher, -1)
    ours = dense_divergence("todi", z, teacher, beta=beta)
    wrong = _todi_not_detached(lp, torch.log_softmax(z, -1), beta)
    torch.testing.assert_close(ours, wrong)  # same value...
    (g_ours,) = torch.autograd.grad(ours.sum(), z)
    (g_wrong,) = torch.autograd.grad(wrong.sum(), z)
    assert (g_ours - g_wrong).abs().max() > 1e-3  # ...different gradient
    expected = _analytic_todi_grad(lp, torch.log_softmax(student, -1), beta, 1.0)
    torch.testing.assert_close(g_ours, expected, rtol=1e-9, atol=1e-12)
    assert (g_wrong - expected).abs().max() > 1e-3


# ------------------------------------------------------------------ sparse form


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_with_k_equal_v_is_dense(kind, temperature):
    student, teacher = _random_pair(9, 13, seed=11)
    lp, ids = torch.log_softmax(teacher / temperature, -1).topk(13, dim=-1)
    z1 = student.clone().requires_grad_(True)
    z2 = student.clone().requires_grad_(True)
    sparse = sparse_divergence(kind, z1, ids, lp, temperature=temperature, chunk_size=4)
    dense = dense_divergence(kind, z2, teacher, temperature=temperature)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    weights = torch.rand(9, dtype=F64)
    (g1,) = torch.autograd.grad((sparse * weights).sum(), z1)
    (g2,) = torch.autograd.grad((dense * weights).sum(), z2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_error_shrinks_as_k_grows(kind):
    v = 40
    student, teacher = _random_pair(3, v, seed=5)
    dense = dense_divergence(kind, student, teacher)
    lp_full = torch.log_softmax(teacher, -1)
    values = []
    for k in range(1, v + 1):
        lp, ids = lp_full.topk(k, dim=-1)
        values.append(sparse_divergence(kind, student, ids, lp))
    values = torch.stack(values)  # [k, N]
    errors = (values - dense).abs()
    assert errors[-1].max() < 1e-12
    if kind == "akl":
        # AKL's per-row weights move with the partition: only on average does the error shrink.
        assert errors[v // 2 :].mean() < errors[: v // 4].mean()
    else:
        # f-divergences (ToDi included) of nested coarsenings increase with k (data processing
        # inequality), so the sparse value climbs monotonically to the dense one.
        assert (values[1:] - values[:-1]).min() > -1e-12
        assert (errors[1:] - errors[:-1]).max() < 1e-12
        assert errors[0].min() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_sparse_matches_unchunked_autograd(kind, temperature, chunk_size):
    student, teacher = _random_pair(11, 19, seed=7, scale=3.0)
    # Rows that exercise the edge paths of the chunked kernel: a tail below e^-40 (log-space
    # backward), a tail that underflows the shared exp (exact recompute), logits of 1e4.
    student[0] = -60.0
    student[0, :5] = 10.0
    student[1] = -1e4
    student[1, :5] = 1e4
    student[2] *= 3000
    lp, ids = torch.log_softmax(teacher / temperature, -1).topk(5, dim=-1)
    ids[:2] = torch.arange(5)
    lp[:2] = torch.log_softmax(teacher[:2] / temperature, -1)[:, :5]
    z1 = student.clone().requires_grad_(True)
    z2 = student.clone().requires_grad_(True)
    ours = sparse_divergence(kind, z1, ids, lp, temperature=temperature, chunk_size=chunk_size)
    ref = reference_sparse_divergence(kind, z2, ids, lp, temperature=temperature)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-9)
    weights = torch.rand(11, dtype=F64)
    (g1,) = torch.autograd.grad((ours * weights).sum(), z1)
    (g2,) = torch.autograd.grad((ref * weights).sum(), z2)
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_sparse_float32_and_bf16_inputs_use_float32_math():
    student, teacher = _random_pair(4, 30, seed=1)
    lp, ids = torch.log_softmax(teacher, -1).topk(6, dim=-1)
    for dtype in (torch.float32, torch.bfloat16):
        z = student.to(dtype).requires_grad_(True)
        out = sparse_divergence("todi", z, ids, lp.float())
        assert out.dtype == torch.float32
        ref = sparse_divergence("todi", z.detach().double(), ids, lp)  # same rounded logits
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        (g,) = torch.autograd.grad(out.sum(), z)
        assert g.dtype == dtype and torch.isfinite(g.float()).all()


def test_teacher_tail_is_stable_when_top_k_holds_all_the_mass():
    # Top-k masses summing to 1, or a hair above (rounding, lossy codec): tail floored, finite.
    lp = torch.log(torch.tensor([[0.7, 0.3], [0.7, 0.3 + 1e-6], [1.0 - 1e-12, 1e-13]]))
    tail = teacher_tail_logprob(lp)
    assert torch.isfinite(tail).all()
    assert (tail >= math.log(TEACHER_TAIL_FLOOR) - 1e-6).all()
    lp_ok = torch.log(torch.tensor([[0.5, 0.25]], dtype=F64))
    torch.testing.assert_close(
        teacher_tail_logprob(lp_ok), torch.log(torch.tensor([0.25], dtype=F64))
    )
    student = torch.tensor([[3.0, 1.0, 0.5, 0.0], [3.0, 1.0, 0.5, 0.0], [9.0, 0.0, 0.0, 0.0]])
    ids = torch.tensor([[0, 1]] * 3)
    for kind in KINDS:
        z = student.clone().requires_grad_(True)
        out = sparse_divergence(kind, z, ids, lp)
        (g,) = torch.autograd.grad(out.sum(), z)
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), kind
        assert (out > -1e-6).all(), kind


def test_sparse_tail_weight_pushes_down_student_mass_outside_top_k():
    # Student overrates an entry outside the teacher's top-2: the tail bucket's reverse-KL
    # pressure must lower that logit (a dropped or renormalized tail would not see it).
    teacher = _row([4.0, 3.0, -5.0, -5.0, -5.0], F64)
    z = _row([4.0, 3.0, 4.0, -5.0, -5.0], F64).requires_grad_(True)
    ids, lp = _topk(teacher, TOP2)
    (g,) = torch.autograd.grad(sparse_divergence("todi", z, ids, lp).sum(), z)
    assert g[0, 2] > 0.1  # gradient descent lowers logit 2


def test_input_validation():
    z = torch.zeros(2, 5)
    ids = torch.zeros(2, 2, dtype=torch.long)
    lp = torch.full((2, 2), -1.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        sparse_divergence("kl", z, ids, lp)
    with pytest.raises(ValueError, match="unknown divergence"):
        dense_divergence("ToDi", z, z)
    with pytest.raises(ValueError, match="int64"):
        sparse_divergence("fkl", z, ids.int(), lp)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        sparse_divergence("fkl", z, torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="shape"):
        sparse_divergence("fkl", z, ids, lp[:, :1])
    with pytest.raises(ValueError, match="beta"):
        dense_divergence("todi", z, z, beta=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sparse_divergence("todi", z, ids, lp, temperature=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        dense_divergence("fkl", z, torch.zeros(2, 4))


def test_no_grad_and_zero_rows():
    z = torch.zeros(3, 4, requires_grad=True)
    with torch.no_grad():
        out = sparse_divergence(
            "todi", z, torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), -2.0)
        )
    assert out.shape == (3,) and not out.requires_grad
    empty = sparse_divergence(
        "todi", torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    )
    assert empty.shape == (0,)


# ------------------------------------------------------------------ properties (hypothesis)

_logit = st.floats(-8.0, 8.0, allow_nan=False, width=32)


@st.composite
def _logit_pairs(draw, extreme=False):
    n = draw(st.integers(1, 3))
    v = draw(st.integers(2, 7))
    elem = st.sampled_from([-1e4, 1e4, 0.0, 3.0, -7.5]) | _logit if extreme else _logit
    s = torch.tensor(draw(st.lists(st.lists(elem, min_size=v, max_size=v), min_size=n, max_size=n)))
    t = torch.tensor(draw(st.lists(st.lists(elem, min_size=v, max_size=v), min_size=n, max_size=n)))
    return s, t


def _sparse_from(teacher: torch.Tensor, k: int, temperature: float = 1.0):
    lp, ids = torch.log_softmax(teacher.double() / temperature, -1).topk(k, dim=-1)
    return ids, lp.float()


@settings(max_examples=60, deadline=None)
@given(_logit_pairs(), st.sampled_from(KINDS), st.sampled_from([0.5, 1.0, 3.0]))
def test_property_non_negative(pair, kind, beta):
    s, t = pair
    assert (dense_divergence(kind, s, t, beta=beta) >= -1e-6).all()
    ids, lp = _sparse_from(t, max(1, t.shape[1] // 2))
    assert (sparse_divergence(kind, s, ids, lp, beta=beta) >= -1e-6).all()


@settings(max_examples=60, deadline=None)
@given(_logit_pairs(extreme=True), st.sampled_from(KINDS), st.sampled_from([1.0, 2.0]))
def test_property_zero_and_no_nan_when_equal(pair, kind, temperature):
    s, _ = pair
    z = s.clone().requires_grad_(True)
    dense = dense_divergence(kind, z, s, temperature=temperature)
    assert dense.abs().max() <= 1e-6
    (g,) = torch.autograd.grad(dense.sum(), z)
    assert torch.isfinite(g).all() and g.abs().max() <= 1e-5
    ids, lp = _sparse_from(s, max(1, s.shape[1] - 2), temperature)
    z = s.clone().requires_grad_(True)
    sparse = sparse_divergence(kind, z, ids, lp, temperature=temperature)
    (g,) = torch.autograd.grad(sparse.sum(), z)
    assert torch.isfinite(sparse).all() and torch.isfinite(g).all()
    # Zero up to rounding wherever the teacher's tail is resolvable; below the floor
    # (TEACHER_TAIL_FLOOR) the teacher's tail is floored and no longer equals the student's.
    resolvable = teacher_tail_logprob(lp) > math.log(10 * TEACHER_TAIL_FLOOR)
    assert (sparse.abs() * resolvable).max() <= 1e-5


@settings(max_examples=60, deadline=None)
@given(_logit_pairs(), st.sampled_from(KINDS))
def test_property_positive_when_distributions_differ(pair, kind):
    s, t = pair
    log_q, log_p = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    tvd = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    differ = tvd > 1e-3
    out = outcome_divergence(kind, log_p, log_q)
    assert (out[differ] > 0).all()


@settings(max_examples=80, deadline=None)
@given(
    _logit_pairs(extreme=True),
    st.sampled_from(KINDS),
    st.sampled_from([0.5, 1.0, 2.0]),
    st.sampled_from([1.0, 2.0]),
    st.data(),
)
def test_property_finite_on_extreme_and_masked_logits(pair, kind, beta, temperature, data):
    s, t = pair
    v = s.shape[1]
    # Mask the same entries on both sides (-inf), as a padded/masked vocabulary would be.
    masked = data.draw(st.lists(st.booleans(), min_size=v, max_size=v))
    masked[data.draw(st.integers(0, v - 1))] = False  # at least one entry stays
    mask = torch.tensor(masked).expand_as(s)
    s, t = s.masked_fill(mask, -math.inf), t.masked_fill(mask, -math.inf)
    z = s.clone().requires_grad_(True)
    dense = dense_divergence(kind, z, t, beta=beta, temperature=temperature)
    (g,) = torch.autograd.grad(dense.sum(), z)
    assert torch.isfinite(dense).all() and torch.isfinite(g).all()
    assert (dense >= -1e-3).all()
    k = data.draw(st.integers(1, v - sum(masked)))
    ids, lp = _sparse_from(t, k, temperature)
    z = s.clone().requires_grad_(True)
    sparse = sparse_divergence(kind, z, ids, lp, beta=beta, temperature=temperature)
    (g,) = torch.autograd.grad(sparse.sum(), z)
    assert torch.isfinite(sparse).all() and torch.isfinite(g).all()
    assert (sparse >= -1e-3).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_renormalized_topk_is_the_divergence_over_the_k_ids_only(kind, temperature):
    """tail=False (the ablation `--topk-target renormalized`): both sides renormalized over the
    teacher's k ids, written out by hand here; chunked == reference in value and gradient."""
    student, teacher = _random_pair(9, 23, seed=3, scale=2.0)
    lp, ids = torch.log_softmax(teacher / temperature, -1).topk(6, dim=-1)
    z1 = student.clone().requires_grad_(True)
    z2 = student.clone().requires_grad_(True)
    ours = sparse_divergence(kind, z1, ids, lp, temperature=temperature, chunk_size=4, tail=False)
    ref = reference_sparse_divergence(kind, z2, ids, lp, temperature=temperature, tail=False)
    by_hand = outcome_divergence(
        kind,
        torch.log_softmax(lp, -1),
        torch.log_softmax((student / temperature).gather(1, ids), -1),
    )
    torch.testing.assert_close(ours, by_hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref, by_hand, rtol=1e-10, atol=1e-12)
    with_tail = sparse_divergence(kind, student, ids, lp, temperature=temperature)
    assert not torch.allclose(with_tail, ours)  # the tail bucket changes the value
    weights = torch.rand(9, dtype=F64)
    (g1,) = torch.autograd.grad((ours * weights).sum(), z1)
    (g2,) = torch.autograd.grad((ref * weights).sum(), z2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)
    # Renormalized over the ids, the student's logits outside them get no gradient at all.
    outside = torch.ones_like(g1, dtype=torch.bool).scatter_(1, ids, False)
    assert g1[outside].abs().max() < 1e-15
