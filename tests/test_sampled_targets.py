"""Sampled teacher targets (#18): the importance-sampling estimate with the teacher as proposal.

    D = sum_v d(p_v, q_v)   is estimated by   D_hat = sum_i w_i d(p_i, q_i) / p_i

(`sampled_divergence`, `sparse_divergence(weights=)`, `chunked_head_loss(weights=)`). The
statistical tests draw targets many times with a seeded generator and compare the MEAN of the
estimate, and of its gradient w.r.t. the student's logits, with the exact dense divergence
(`dense_divergence`, autograd). The tolerance is k standard errors of that mean, where the
standard error is computed EXACTLY from the distributions (`_per_draw_moments`), not from the
sample: the reverse-KL side is heavy-tailed (a rarely drawn token with a large weight q/p), so
an empirical SE of 0 for a token never drawn would make any test fail or any test pass.

Measured variance (exact, `test_reverse_side_variance_exceeds_forward_side`; V = 300, teacher
logits 2 randn, student = teacher + randn; "overrating": the student also puts ~4 % each on 3
tokens the teacher gives 2e-3). Per-draw standard deviation of D_hat (sd(D_hat) * sqrt(N)),
mean over 3 positions; the last column is Var(D_hat) of the hybrid (exact top-8 + 42 draws)
over pure RS-KD (50 draws), the same k = 50 budget:

    student      T   FKL    RKL    ToDi(b=1)   Var RKL / Var FKL   RKL: hybrid / pure
    mild         1   0.89   1.84   1.54         4.3                 0.50
    mild         2   0.46   0.60   0.35         1.7                 0.86
    overrating   1   0.93   5.87   5.54        40                   0.62
    overrating   2   0.50   2.06   1.82        17                   0.98

The forward side's per-draw weight is bounded (w r); the reverse side's carries q/p, so its
variance grows where the student overrates tokens the teacher rarely samples (x10 here at
T = 1 while FKL's stays put); the hybrid's exact head removes the head's share only (FKL:
hybrid / pure = 0.31 at T = 1, mild), not the overrated tokens' (outside the head).
"""

from __future__ import annotations

import math

import pytest
import torch

from todi.storage.batches import IGNORE_INDEX, Batch
from todi.trainer.chunked import (
    chunked_head_loss,
    reference_head_loss,
    reference_sparse_divergence,
    sparse_divergence,
)
from todi.trainer.divergences import (
    ELEMENTWISE_KINDS,
    KINDS,
    check_kind_for_weights,
    dense_divergence,
    outcome_terms,
    sampled_divergence,
)

F64 = torch.float64
REPS, DRAWS, POSITIONS, VOCAB = 2000, 50, 3, 300
HEAD = 8  # exact head of the hybrid
KIND_BETAS = [(k, 1.0) for k in ELEMENTWISE_KINDS if k != "todi"] + [
    ("todi", b) for b in (0.5, 1.0, 2.0)
]


def _problem(temperature: float, overrate: bool, seed: int = 0, v: int = VOCAB):
    """Teacher and student logits [POSITIONS, v] (float64); student = teacher + noise, and with
    `overrate` the student also puts high logits on 3 tokens the teacher gives about 2e-3."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(POSITIONS, v, generator=gen, dtype=F64)
    student = teacher + torch.randn(POSITIONS, v, generator=gen, dtype=F64)
    if overrate:
        lp = torch.log_softmax(teacher / temperature, -1)
        near = (lp - math.log(2e-3)).abs().argsort(-1)[:, :3]
        top = student.amax(-1, keepdim=True) - 1.0
        student.scatter_(1, near, top.expand(-1, 3))
    return teacher, student


def _rs_kd_counts(log_p: torch.Tensor, gen: torch.Generator):
    """RS-KD as distinct ids with counts: REPS independent sets of DRAWS draws per row.

    Returns ids [REPS * P, DRAWS] (the distinct drawn ids, then padding: ids that were not
    drawn, w = 0), weights c_u / DRAWS. Row r * P + i is repetition r of position i."""
    probs = log_p.exp().repeat(REPS, 1)
    draws = torch.multinomial(probs, DRAWS, replacement=True, generator=gen)
    counts = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=F64))
    c, ids = counts.topk(DRAWS, dim=-1)  # at most DRAWS distinct ids; the rest count 0
    return ids, c / DRAWS


def _hybrid_draws(log_p: torch.Tensor, gen: torch.Generator):
    """Exact top-HEAD (w = p) plus DRAWS - HEAD draws from the rest renormalized, each draw
    listed separately (ids repeat) with w = P_rest / N_rest."""
    n_rest = DRAWS - HEAD
    head_lp, head = log_p.topk(HEAD, dim=-1)
    rest = log_p.exp().scatter(1, head, 0.0)
    p_rest = rest.sum(-1, keepdim=True)
    draws = torch.multinomial((rest / p_rest).repeat(REPS, 1), n_rest, True, generator=gen)
    ids = torch.cat([head.repeat(REPS, 1), draws], dim=1)
    w = torch.cat([head_lp.exp().repeat(REPS, 1), (p_rest / n_rest).repeat(REPS, n_rest)], 1)
    return ids, w


def _proposal(log_p: torch.Tensor, hybrid: bool) -> tuple[torch.Tensor, int]:
    """(pi [P, V], draws per repetition): the distribution each random draw comes from."""
    p = log_p.exp()
    if not hybrid:
        return p, DRAWS
    rest = p.scatter(1, log_p.topk(HEAD, dim=-1).indices, 0.0)
    return rest / rest.sum(-1, keepdim=True), DRAWS - HEAD


def _per_draw_moments(kind, beta, log_p, log_q, pi, temperature):
    """Exact variance of ONE random draw's contribution, for the value and for the gradient
    w.r.t. the student logits z (the head of the hybrid is deterministic: no variance).

    A draw v ~ pi contributes f(v) = d_v / pi_v to D_hat; its gradient is
    h(v)_j = (1/T)(g_v [j = v] - q_j g_v), g_v = (d d_v / d log q_v) / pi_v. So
        E f = sum pi f,  E f^2 = sum pi f^2,
        E h_j = (1/T)(pi_j g_j - q_j sum pi g),
        E h_j^2 = (1/T^2)(pi_j g_j^2 (1 - 2 q_j) + q_j^2 sum pi g^2).
    Computed from the DENSE per-entry terms (`outcome_terms`), not the sampled code path.
    Returns (var f [P], var h [P, V])."""
    lq = log_q.detach().requires_grad_(True)
    terms = outcome_terms(kind, log_p, lq, beta=beta)
    (dterm,) = torch.autograd.grad(terms.sum(), lq)  # diagonal: each term has its own log q
    on = pi > 0
    safe = torch.where(on, pi, torch.ones_like(pi))
    f = torch.where(on, terms.detach() / safe, torch.zeros_like(pi))
    g = torch.where(on, dterm / safe, torch.zeros_like(pi))
    var_f = (pi * f**2).sum(-1) - (pi * f).sum(-1) ** 2
    q, t = log_q.exp(), temperature
    e_h = (pi * g - q * (pi * g).sum(-1, keepdim=True)) / t
    e_h2 = (pi * g**2 * (1 - 2 * q) + q**2 * (pi * g**2).sum(-1, keepdim=True)) / t**2
    return var_f, (e_h2 - e_h**2).clamp_min(0.0)


def _check_unbiased(kind, beta, temperature, overrate, hybrid):
    teacher, student = _problem(temperature, overrate, seed=len(kind))
    log_p = torch.log_softmax(teacher / temperature, -1)
    gen = torch.Generator().manual_seed(17)
    ids, w = _hybrid_draws(log_p, gen) if hybrid else _rs_kd_counts(log_p, gen)
    lps = log_p.repeat(REPS, 1).gather(1, ids)
    lps = torch.where(w > 0, lps, torch.zeros_like(lps))  # padding: arbitrary log-prob 0
    z = student.repeat(REPS, 1).requires_grad_(True)
    est = sparse_divergence(kind, z, ids, lps, weights=w, beta=beta, temperature=temperature)
    est.sum().backward()
    z_exact = student.clone().requires_grad_(True)
    exact = dense_divergence(kind, z_exact, teacher, beta=beta, temperature=temperature)
    exact.sum().backward()

    pi, n = _proposal(log_p, hybrid)
    var_f, var_h = _per_draw_moments(
        kind, beta, log_p, torch.log_softmax(student / temperature, -1), pi, temperature
    )
    se = (var_f / (n * REPS)).sqrt()
    mean = est.detach().view(REPS, POSITIONS).mean(0)
    assert ((mean - exact.detach()).abs() <= 4 * se + 1e-9).all(), (mean, exact, se)

    grad_mean = z.grad.view(REPS, POSITIONS, -1).mean(0)
    grad_se = (var_h / (n * REPS)).sqrt()
    err = (grad_mean - z_exact.grad).abs()
    # 5 SE per entry: 900 entries per test, so a 4-SE bound would fail by chance now and then.
    assert (err <= 5 * grad_se + 1e-9).all(), float((err / (grad_se + 1e-30)).max())
    # Direction: the mean's noise has expected squared norm sum(grad_se^2), so its cosine with
    # the exact gradient is about (1 + noise^2 / signal^2)^-1/2; allow twice that noise norm.
    cos = torch.nn.functional.cosine_similarity(grad_mean.flatten(), z_exact.grad.flatten(), 0)
    noise = float((grad_se**2).sum() / (z_exact.grad**2).sum())
    assert cos > max(0.98, (1 + 4 * noise) ** -0.5), (float(cos), noise)


@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("overrate", [False, True], ids=["mild", "overrating"])
def test_rs_kd_draws_are_unbiased_in_value_and_gradient(kind, beta, temperature, overrate):
    """Pure sampling (RS-KD): DRAWS draws from p, distinct ids with w = c_u / N (padding w = 0
    fills the row), REPS repetitions: the mean estimate and mean gradient are the dense ones."""
    _check_unbiased(kind, beta, temperature, overrate, hybrid=False)


@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("overrate", [False, True], ids=["mild", "overrating"])
def test_hybrid_head_plus_draws_is_unbiased_in_value_and_gradient(
    kind, beta, temperature, overrate
):
    """Exact top-8 head (w = p) + 42 draws from the renormalized rest, each draw listed on its
    own (ids repeat, w = P_rest / 42): unbiased too."""
    _check_unbiased(kind, beta, temperature, overrate, hybrid=True)


def test_the_check_rejects_a_biased_estimate():
    """The same harness on a known-biased estimate: RKL from the draws' own frequencies as
    the teacher (what storing only counts would give, log p_u := log(c_u / N)) is far off."""
    temperature = 1.0
    teacher, student = _problem(temperature, overrate=False)
    log_p = torch.log_softmax(teacher / temperature, -1)
    ids, w = _rs_kd_counts(log_p, torch.Generator().manual_seed(17))
    freq_lp = torch.where(w > 0, w.clamp_min(1e-30).log(), torch.zeros_like(w))
    est = sampled_divergence(
        "rkl", freq_lp, torch.log_softmax(student.repeat(REPS, 1), -1).gather(1, ids), w
    )
    exact = dense_divergence("rkl", student, teacher)
    var_f, _ = _per_draw_moments(
        "rkl", 1.0, log_p, torch.log_softmax(student, -1), log_p.exp(), temperature
    )
    se = (var_f / (DRAWS * REPS)).sqrt()
    mean = est.view(REPS, POSITIONS).mean(0)
    assert ((mean - exact).abs() > 10 * se).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_side_variance_exceeds_forward_side(temperature):
    """The numbers in the module docstring (exact per-draw variances). The RKL side's
    variance grows where the student overrates tokens the teacher rarely samples; FKL's
    hardly moves. The hybrid's exact head lowers the RKL variance."""
    sd = {}
    for overrate in (False, True):
        teacher, student = _problem(temperature, overrate, seed=0)
        log_p = torch.log_softmax(teacher / temperature, -1)
        log_q = torch.log_softmax(student / temperature, -1)
        for kind in ("fkl", "rkl", "todi"):
            for hybrid in (False, True):
                pi, _ = _proposal(log_p, hybrid)
                # hybrid: per draw of the rest (the head is exact and costs no variance)
                var_f, _ = _per_draw_moments(kind, 1.0, log_p, log_q, pi, temperature)
                sd[overrate, kind, hybrid] = float(var_f.sqrt().mean())
    ratio_mild = (sd[False, "rkl", False] / sd[False, "fkl", False]) ** 2
    ratio_over = (sd[True, "rkl", False] / sd[True, "fkl", False]) ** 2
    assert ratio_over > 10 and ratio_over > 3 * ratio_mild, (ratio_mild, ratio_over)
    assert sd[True, "fkl", False] < 1.2 * sd[False, "fkl", False]
    for overrate in (False, True):
        assert sd[overrate, "rkl", True] < sd[overrate, "rkl", False]
    print({k: round(v, 3) for k, v in sd.items()}, ratio_mild, ratio_over)


# --------------------------------------------------------------------------------------------
# Exactness and the engine


@pytest.mark.parametrize("kind", ELEMENTWISE_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_weights_p_over_every_id_is_the_dense_divergence(kind, temperature, dtype):
    """k = V listed ids with w = p: the estimate is the full-vocabulary value exactly (to float
    rounding), gradient included (engine and reference)."""
    teacher, student = _problem(temperature, overrate=True, v=97)
    teacher, student = teacher.to(dtype), student.to(dtype)
    lp = torch.log_softmax(teacher / temperature, -1)
    ids = torch.randperm(97, generator=torch.Generator().manual_seed(3)).expand(POSITIONS, -1)
    ids = ids.contiguous()
    w, lps = lp.gather(1, ids).exp(), lp.gather(1, ids)
    want_z = student.clone().requires_grad_(True)
    want = dense_divergence(kind, want_z, teacher, beta=1.5, temperature=temperature)
    want.sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    for impl in (sparse_divergence, reference_sparse_divergence):
        z = student.clone().requires_grad_(True)
        got = impl(kind, z, ids, lps, weights=w, beta=1.5, temperature=temperature)
        got.sum().backward()
        torch.testing.assert_close(got, want.detach(), **tol)
        torch.testing.assert_close(z.grad, want_z.grad, **tol)


def _weighted_case(n=11, v=53, k=9, temperature=1.0, seed=0, dtype=torch.float32):
    """Logits, and weighted targets with a repeated id and padding (w = 0, id 0, log-prob 0)."""
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(n, v, generator=gen, dtype=dtype)
    lp = torch.log_softmax(2 * torch.randn(n, v, generator=gen, dtype=dtype) / temperature, -1)
    ids = torch.multinomial(lp.exp().float(), k, replacement=True, generator=gen)
    ids[:, 1] = ids[:, 0]  # a repeated id in every row
    w = torch.rand(n, k, generator=gen, dtype=dtype)
    lps = lp.gather(1, ids)
    ids[:, -2:], lps[:, -2:], w[:, -2:] = 0, 0.0, 0.0  # padding
    return student, ids, lps, w


@pytest.mark.parametrize("kind", ELEMENTWISE_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_chunked_engine_matches_reference_on_weighted_targets(kind, temperature, chunk_size, dtype):
    """Chunk boundaries (4 does not divide 11), T != 1, repeated ids, padding; an upstream
    gradient that differs per row. float32: the two log-softmaxes round differently, and the
    estimate sums signed terms w * r of size ~10 (atol 2e-5)."""
    student, ids, lps, w = _weighted_case(temperature=temperature, seed=len(kind), dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    kw = {"weights": w, "beta": 0.7, "temperature": temperature}
    got = sparse_divergence(kind, a, ids, lps, chunk_size=chunk_size, **kw)
    want = reference_sparse_divergence(kind, b, ids, lps, **kw)
    up = torch.linspace(0.5, 2.0, len(student), dtype=dtype)
    (got * up).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(a.grad, b.grad, **tol)


def _head_case(temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    n, h, v, k = 13, 8, 29, 7
    hidden = torch.randn(n, h, generator=gen, dtype=F64)
    weight = torch.randn(v, h, generator=gen, dtype=F64)
    bias = torch.randn(v, generator=gen, dtype=F64)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[1, n - 2]] = IGNORE_INDEX
    teacher = hidden @ weight.T + torch.randn(n, v, generator=gen, dtype=F64)
    lp = torch.log_softmax(teacher / temperature, -1)
    ids = torch.multinomial(lp.exp(), k, replacement=True, generator=gen)
    w = torch.rand(n, k, generator=gen, dtype=F64)
    lps = lp.gather(1, ids)
    ids[:, -1], lps[:, -1], w[:, -1] = 3, -7.0, 0.0  # padding
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    return leaves, labels, ids, lps, w


@pytest.mark.parametrize("kind", ELEMENTWISE_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_head_loss_matches_reference_on_weighted_targets(kind, temperature):
    """Fused (kd_weight given) and recompute modes, several chunk sizes, ignored rows."""
    leaves, labels, ids, lps, w = _head_case(temperature, seed=len(kind))
    kw = {"kind": kind, "beta": 1.3, "temperature": temperature, "weights": w}
    ref = reference_head_loss(*leaves, labels, ids, lps, **kw)
    ref_loss = 0.7 * ref.ce_sum + 0.3 * ref.div_sum
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    for chunk, fused in ((1, None), (4, None), (7, 0.3), (64, 0.3), (4, 0.5)):
        ours = chunked_head_loss(*leaves, labels, ids, lps, chunk_size=chunk, kd_weight=fused, **kw)
        torch.testing.assert_close(ours.ce_sum, ref.ce_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.div_sum, ref.div_sum, rtol=1e-12, atol=1e-12)
        # (4, 0.5): announced 0.5 but weighted 0.7 / 0.3, so backward must recompute.
        grads = torch.autograd.grad(0.7 * ours.ce_sum + 0.3 * ours.div_sum, leaves)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ELEMENTWISE_KINDS)
def test_repeated_ids_accumulate_and_padding_adds_nothing(kind):
    """An id listed twice with w/2 each is the id listed once with w (value and gradient: a
    scatter that overwrote instead of adding would halve it); padding entries (w = 0), whatever
    their ids and log-probs, change neither."""
    student, ids, lps, w = _weighted_case(seed=5)
    base_ids, base_lps, base_w = ids[:, 1:-2], lps[:, 1:-2], w[:, 1:-2].clone()
    base_w[:, 0] = w[:, 0] + w[:, 1]  # column 1 of the full case repeats column 0's id
    full_w = w.clone()
    full_w[:, 0] = full_w[:, 1] = base_w[:, 0] / 2
    lps_odd = lps.clone()
    lps_odd[:, -2:] = torch.tensor([-50.0, 3.0])  # padding log-probs: arbitrary
    ids_odd = ids.clone()
    ids_odd[:, -2:] = torch.tensor([7, 52])
    results = []
    for i, lp_, w_ in (
        (base_ids, base_lps, base_w),
        (ids, lps, full_w),
        (ids_odd, lps_odd, full_w),
    ):
        for impl in (sparse_divergence, reference_sparse_divergence):
            z = student.clone().requires_grad_(True)
            d = impl(kind, z, i, lp_, weights=w_, temperature=2.0)
            d.sum().backward()
            results.append((d.detach(), z.grad))
    for d, g in results[1:]:
        torch.testing.assert_close(d, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, results[0][1], rtol=1e-5, atol=1e-6)
    # Only padding: exactly zero value and gradient.
    z = student.clone().requires_grad_(True)
    d = sparse_divergence(kind, z, ids, lps_odd, weights=torch.zeros_like(w))
    d.sum().backward()
    assert not d.any() and not z.grad.any()


def test_refusals():
    student, ids, lps, w = _weighted_case()
    for impl in (sparse_divergence, reference_sparse_divergence):
        with pytest.raises(ValueError, match="AKL"):
            impl("akl", student, ids, lps, weights=w)
        with pytest.raises(ValueError, match="renormalized"):
            impl("todi", student, ids, lps, weights=w, tail=False)
        with pytest.raises(ValueError, match=">= 0"):
            impl("todi", student, ids, lps, weights=-w)
        with pytest.raises(ValueError, match="shaped like the ids"):
            impl("todi", student, ids, lps, weights=w[:, :-1])
        with pytest.raises(ValueError, match="finite teacher log-prob"):
            impl("todi", student, ids, lps.index_fill(1, torch.tensor([2]), -math.inf), weights=w)
        # Padding may hold anything; and k > V is fine when ids repeat (draws listed singly).
        impl("todi", student, ids, lps.index_fill(1, torch.tensor([8]), -math.inf), weights=w)
        many = ids.repeat(1, 7)
        impl("todi", student, many, lps.repeat(1, 7), weights=w.repeat(1, 7) / 7)
    with pytest.raises(ValueError, match="not a sum of per-token terms"):
        check_kind_for_weights("akl")
    for kind in ELEMENTWISE_KINDS:
        check_kind_for_weights(kind)
    assert set(KINDS) - set(ELEMENTWISE_KINDS) == {"akl"}


def test_no_nan_when_a_listed_teacher_prob_is_tiny():
    """A hybrid head entry with p = e^-100 (w = p underflows in float32) and a student that
    puts real mass there: the q/p weight is formed in log space, so everything stays finite."""
    z = torch.zeros(1, 8, requires_grad=True)
    lps = torch.tensor([[-100.0, -0.01]])
    w = torch.tensor([[math.exp(-100.0), 0.5]])  # 3.7e-44: a float32 denormal
    ids = torch.tensor([[3, 5]])
    for kind in ELEMENTWISE_KINDS:
        z.grad = None
        d = sparse_divergence(kind, z, ids, lps, weights=w)
        d.sum().backward()
        assert torch.isfinite(d).all() and torch.isfinite(z.grad).all(), kind


# --------------------------------------------------------------------------------------------
# Through the trainer's objective


def test_batch_carries_weights_and_the_objective_uses_them():
    """`Batch.target_weights` survives `.to()`, and `batch_sums` passes it to the chunked head
    loss: the same as `reference_head_loss(weights=)` on the model's own hidden states."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from todi.trainer.student import body_and_head
    from todi.trainer.train import StudentObjective, batch_sums

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    b, t, k = 2, 6, 5
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (b, t), generator=gen)
    labels = torch.full((b, t), IGNORE_INDEX)
    labels[:, 2:5] = input_ids[:, 3:6]
    lp = torch.log_softmax(torch.randn(b, t, 64, generator=gen), -1)
    ids = torch.multinomial(lp.exp().view(-1, 64), k, True, generator=gen).view(b, t, k)
    w = torch.rand(b, t, k, generator=gen)
    batch = Batch(
        input_ids, torch.ones_like(input_ids), labels, ids, lp.gather(2, ids), ["a", "b"], w
    )
    moved = batch.to("cpu")
    assert moved.target_weights is not None and torch.equal(moved.target_weights, w)
    assert Batch(*batch.to("cpu").__dict__.values()).target_weights is not None
    objective = StudentObjective(model, kind="todi", beta=1.0, temperature=2.0, chunk_size=4)
    with torch.no_grad():
        ce, div = batch_sums(objective, batch)
        _, div_topk = batch_sums(objective, Batch(*list(batch.__dict__.values())[:6]))
        mask = labels != IGNORE_INDEX
        body, weight, _ = body_and_head(model)
        hidden = body(input_ids=input_ids).last_hidden_state[mask]
        want = reference_head_loss(
            hidden,
            weight,
            None,
            labels[mask],
            ids[mask],
            lp.gather(2, ids)[mask],
            temperature=2.0,
            weights=w[mask],
        )
    torch.testing.assert_close(div, want.div_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, want.ce_sum, rtol=1e-5, atol=1e-6)
    assert float(div_topk) != pytest.approx(float(div), rel=1e-3)  # weights did change it


# --------------------------------------------------------------------------------------------
# End to end with the capture half: `select` (teacher side) -> `collate` (the batch's weights)


@pytest.mark.parametrize(("head", "train_t"), [(0, 1.0), (4, 1.0), (4, 2.0)])
@pytest.mark.parametrize("kind", ["todi", "rkl"])
def test_captured_targets_through_collate_give_an_unbiased_estimate(head, train_t, kind):
    """The teacher service's `select` (draws only, or exact top-4 + draws from the rest; at the
    capture T = 1, or re-tempered to T = 2 with importance weights p_2 / p_1), the storage
    `collate` that fills `Batch.target_weights`, then `sparse_divergence(weights=)`: the mean
    over 600 independent captures is the dense divergence within 4 exact standard errors."""
    import numpy as np

    from todi.services.targets import TargetRequest, select, sequence_generator
    from todi.storage import Sample, ShardSetMetadata, collate

    trials, draws = 600, 50
    teacher, student = (x[:1] for x in _problem(train_t, overrate=False, seed=2))
    retemper = (train_t,) if train_t != 1.0 else ()
    req = TargetRequest(targets="sampled", top_k=head, draws=draws, retemper=retemper)
    meta = ShardSetMetadata(
        teacher_model="synthetic",
        teacher_fingerprint="sha256:t",
        tokenizer_sha256="sha256:tok",
        vocab_size=VOCAB,
        top_k=head,
        temperature=1.0,
        logprobs_mode="log_softmax_fp32",
        backend="hf",
        targets="sampled",
        draws=draws,
        sample_seed=0,
        retemper_temperatures=retemper,
    )
    lp1 = torch.log_softmax(teacher, -1).float()
    samples = []
    for i in range(trials):
        t = select(lp1, req, temperature=1.0, generator=sequence_generator(i, "u"))
        samples.append(
            Sample(
                f"s{i}",
                np.zeros(2, np.int32),
                0,
                t.topk_ids,
                t.topk_logprobs,
                t.draws,
                t.tail_logz,
            )
        )
    batch = collate(samples, meta=meta, temperature=None if train_t == 1.0 else train_t)
    mask = batch.loss_mask
    assert batch.target_weights is not None and int(mask.sum()) == trials
    ids, lps, w = batch.topk_ids[mask], batch.topk_logprobs[mask], batch.target_weights[mask]
    est = sparse_divergence(
        kind, student.repeat(trials, 1), ids, lps, weights=w, temperature=train_t
    )
    exact = float(dense_divergence(kind, student, teacher, temperature=train_t))
    # The draws come from p_1 (outside the head for the hybrid): that is the proposal.
    pi = lp1.double().exp()
    if head:
        pi = pi.scatter(1, lp1.topk(head, dim=-1).indices, 0.0)
        pi = pi / pi.sum()
    var_f, _ = _per_draw_moments(
        kind,
        1.0,
        torch.log_softmax(teacher / train_t, -1),
        torch.log_softmax(student / train_t, -1),
        pi,
        train_t,
    )
    se = float((var_f / (draws * trials)).sqrt())
    # + 2e-3 relative: the stored log-probs are float32 and the re-tempered ones go through
    # the recorded tail log-partition (float32 here).
    assert abs(float(est.double().mean()) - exact) <= 4 * se + 2e-3 * exact, (est.mean(), exact, se)
