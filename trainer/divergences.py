"""Divergences between a teacher distribution p and a student distribution q: the math.

The math is `docs/method.md`. Everything is built on one core,
`outcome_divergence(kind, log_p, log_q)`, over a distribution on a finite set of *outcomes*:

- dense (`dense_divergence`): the outcomes are the vocabulary entries,
  log p = log_softmax(teacher / T), log q = log_softmax(student / T);
- sparse (`todi.trainer.chunked.sparse_divergence`): the outcomes are the teacher's k cached
  ids plus one tail bucket holding the rest of the vocabulary (the *coarsened* distributions):
      log p = [stored top-k log-probs, log(1 - sum_k p_k)]     (`coarsened_teacher`)
      log q = [log q at the k ids,     logsumexp(student / T over the other ids) - logsumexp(all)]
  Neither side is renormalized over the top-k and the tail is never dropped: that keeps the
  reverse-KL pressure on tokens the student overrates outside the teacher's top-k.

- sampled (`sampled_divergence`, `sparse_divergence(weights=)`): the outcomes are k listed
  ids with weights w (sampled teacher targets), and the per-outcome terms estimate the
  full-vocabulary sum by importance sampling with the teacher as proposal,
      D_hat = sum_i w_i d(p_i, q_i) / p_i        (no tail bucket; not for AKL)

So every divergence has exactly one implementation (a small pure function of the log-probs and
of the two masses weighting its p-side and q-side, `_TERMS`; AKL apart), and the sparse and
sampled forms equal the dense form when k = V (sampled: with w = p). The chunking engine that
applies any of them to [N, V] logits without holding them whole is `todi.trainer.chunked`; it
uses this module's public names only.

Conventions shared by all divergences (rows = positions, last dim = outcomes):
- inputs are log-probabilities; math runs in float32 (float64 stays float64, `math_dtype`);
- an outcome with probability 0 on both sides (log-prob -inf, e.g. a masked vocabulary entry)
  contributes exactly 0 and gets a zero gradient: -inf is replaced by the finite `_NEG`
  (-1e30) first, whose exp is exactly 0 and whose differences are exactly 0, so no inf - inf
  or 0 * inf appears anywhere (no NaN, in values or gradients). A support mismatch (p > 0
  where q = 0) gives a huge finite value (about p * 1e30) instead of +inf;
- the teacher is a constant: only the student side is meant to be differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import torch
from torch import Tensor

KINDS: Final = ("fkl", "rkl", "todi", "js", "tvd", "skl", "srkl", "akl")

SKEW_LAMBDA: Final = 0.1
"""Skew of the skewed KLs (`skl`, `srkl`), as in DistiLLM and the ToDi reference code."""

AKL_MU: Final = 0.5
"""Head/tail split of adaptive KL: cumulative teacher mass mu (Wu et al. 2024)."""

TEACHER_TAIL_FLOOR: Final = float(torch.finfo(torch.float32).eps)
"""Smallest teacher tail mass 1 - sum_k p_k that the sparse form trusts (about 1.2e-7).

The stored top-k log-probs are float32 (or coarser after the shard codec), so a computed tail
below float32's resolution at 1.0 is rounding noise, and it can even come out <= 0 when the top
k hold nearly all the mass. Flooring it keeps the tail's reverse-KL term finite
(q_tail * log(q_tail / p_tail)) while still pushing the student's tail mass down hard."""

_NEG: Final = -1e30
_LOG2: Final = math.log(2.0)

# --------------------------------------------------------------------------------------------
# The divergences over outcomes. Each takes log p (teacher) and log q (student), shape [..., K],
# each a normalized distribution over the K outcomes, and returns the per-row value [...].


def math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when an input is float64 (bf16/fp16 are promoted to float32)."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _prepare(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cast to the math dtype and replace -inf by `_NEG`; returns (log p, log q, p, q)."""
    dtype = math_dtype(log_p.dtype, log_q.dtype)
    # clamp_min has gradient 0 at the clamped (-inf) entries and 1 elsewhere.
    lp = log_p.to(dtype).clamp_min(_NEG)
    lq = log_q.to(dtype).clamp_min(_NEG)
    return lp, lq, lp.exp(), lq.exp()


# Every elementwise divergence is a sum over outcomes of d(p_v, q_v), and every such d here is
# linear in the two masses once the log-probs are fixed: d = p * a(log p, log q) + q * b(...)
# (TVD: |p - q| / 2). So each kind is written ONCE as a function of the log-probs and of two
# masses (mp, mq) that multiply its p-side and its q-side:
#   exact terms (`outcome_terms`):       mp = p,  mq = q                    -> d_v
#   importance-weighted (`sampled_*`):   mp = w,  mq = w * q / p            -> w_v * d_v / p_v
# The second is d / p times the weight without ever dividing by a small p: mq is formed in log
# space, exp(log w + log q - log p).


def _fkl_terms(lp: Tensor, lq: Tensor, mp: Tensor, mq: Tensor, beta: float) -> Tensor:
    return mp * (lp - lq)


def _rkl_terms(lp: Tensor, lq: Tensor, mp: Tensor, mq: Tensor, beta: float) -> Tensor:
    return mq * (lq - lp)


def _todi_terms(lp: Tensor, lq: Tensor, mp: Tensor, mq: Tensor, beta: float) -> Tensor:
    r = lp - lq
    alpha = torch.sigmoid(beta * r).detach()
    return alpha * mp * r - (1.0 - alpha) * mq * r


def _js_terms(lp: Tensor, lq: Tensor, mp: Tensor, mq: Tensor, beta: float) -> Tensor:
    lm = torch.logaddexp(lp, lq) - _LOG2
    return 0.5 * (mp * (lp - lm) + mq * (lq - lm))


def _tvd_terms(lp: Tensor, lq: Tensor, mp: Tensor, mq: Tensor, beta: float) -> Tensor:
    return 0.5 * (mp - mq).abs()


def _skl_terms(lp: Tensor, lq: Tensor, mp: Tensor, mq: Tensor, beta: float) -> Tensor:
    lm = torch.logaddexp(lp + math.log(SKEW_LAMBDA), lq + math.log1p(-SKEW_LAMBDA))
    return mp * (lp - lm)


def _srkl_terms(lp: Tensor, lq: Tensor, mp: Tensor, mq: Tensor, beta: float) -> Tensor:
    lm = torch.logaddexp(lp + math.log1p(-SKEW_LAMBDA), lq + math.log(SKEW_LAMBDA))
    return mq * (lq - lm)


_TERMS: Final[dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]]] = {
    "fkl": _fkl_terms,
    "rkl": _rkl_terms,
    "todi": _todi_terms,
    "js": _js_terms,
    "tvd": _tvd_terms,
    "skl": _skl_terms,
    "srkl": _srkl_terms,
}
ELEMENTWISE_KINDS: Final = tuple(_TERMS)
"""The kinds that are a sum of per-outcome terms (all but AKL): the ones weighted (sampled)
targets can estimate."""


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Forward KL: FKL(p || q) = sum_v p_v (log p_v - log q_v)."""
    lp, lq, p, q = _prepare(log_p, log_q)
    return _fkl_terms(lp, lq, p, q, 1.0).sum(-1)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Reverse KL: RKL = KL(q || p) = sum_v q_v (log q_v - log p_v)."""
    lp, lq, p, q = _prepare(log_p, log_q)
    return _rkl_terms(lp, lq, p, q, 1.0).sum(-1)


def todi(log_p: Tensor, log_q: Tensor, *, beta: float = 1.0) -> Tensor:
    """ToDi (Jung et al. 2025): a per-outcome mix of forward and reverse KL.

        r_v     = log p_v - log q_v
        alpha_v = sigmoid(beta * r_v)        (a constant: detached, no gradient)
        ToDi    = sum_v alpha_v p_v r_v + (1 - alpha_v) q_v (-r_v)

    Each term is >= 0 for beta > 0 and 0 iff p_v = q_v. With beta = 1 the value equals
    FKL + RKL (alpha = p / (p + q)) but the gradient does not, because alpha is detached:
    d ToDi / d log q_v = q_v g_v with g_v = -alpha_v p_v / q_v + (1 - alpha_v)(log(q_v/p_v) + 1).
    """
    lp, lq, p, q = _prepare(log_p, log_q)
    return _todi_terms(lp, lq, p, q, beta).sum(-1)


def js_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen-Shannon: JS = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2.

    log m = logaddexp(log p, log q) - log 2 is exact in log space (the reference code adds 1e-9
    inside the logs instead; the difference is below 1e-8 on the golden example)."""
    lp, lq, p, q = _prepare(log_p, log_q)
    return _js_terms(lp, lq, p, q, 1.0).sum(-1)


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance: TVD = 1/2 sum_v |p_v - q_v|."""
    lp, lq, p, q = _prepare(log_p, log_q)
    return _tvd_terms(lp, lq, p, q, 1.0).sum(-1)


def skewed_forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Skewed forward KL (DistiLLM; ToDi reference code): SKL = KL(p || lam p + (1 - lam) q),
    lam = `SKEW_LAMBDA`. The mixture is formed in log space:
    log m = logaddexp(log lam + log p, log(1-lam) + log q)."""
    lp, lq, p, q = _prepare(log_p, log_q)
    return _skl_terms(lp, lq, p, q, 1.0).sum(-1)


def skewed_reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Skewed reverse KL (DistiLLM; ToDi reference code): SRKL = KL(q || (1 - lam) p + lam q),
    lam = `SKEW_LAMBDA`."""
    lp, lq, p, q = _prepare(log_p, log_q)
    return _srkl_terms(lp, lq, p, q, 1.0).sum(-1)


def adaptive_kl(log_p: Tensor, log_q: Tensor, *, mu: float = AKL_MU) -> Tensor:
    """Adaptive KL (Wu et al. 2024, as in the ToDi reference code): one weight per row.

    Sort the outcomes by teacher probability, ascending; the *tail* is the prefix whose
    cumulative teacher mass is <= mu, the *head* the rest. With the gaps |p_v - q_v|:
        g_head = sum_head |p - q|,  g_tail = sum_tail |p - q|     (constants: detached)
        AKL    = g_head / (g_head + g_tail) * FKL + g_tail / (g_head + g_tail) * RKL
    When p == q both gaps are 0 (and FKL = RKL = 0): the weights are then 1/2 each, not 0/0.
    """
    lp, lq, p, q = _prepare(log_p, log_q)
    with torch.no_grad():
        p_sorted, order = p.sort(dim=-1)
        gap = (p_sorted - q.gather(-1, order)).abs()
        in_tail = p_sorted.cumsum(-1) <= mu
        g_tail = (gap * in_tail).sum(-1)
        g_head = (gap * ~in_tail).sum(-1)
        total = g_head + g_tail
        safe = torch.where(total > 0, total, torch.ones_like(total))
        w_head = torch.where(total > 0, g_head / safe, torch.full_like(total, 0.5))
        w_tail = torch.where(total > 0, g_tail / safe, torch.full_like(total, 0.5))
    fkl = (p * (lp - lq)).sum(-1)
    rkl = (q * (lq - lp)).sum(-1)
    return w_head * fkl + w_tail * rkl


_DIVERGENCES: Final[dict[str, Callable[..., Tensor]]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "todi": todi,
    "js": js_divergence,
    "tvd": total_variation,
    "skl": skewed_forward_kl,
    "srkl": skewed_reverse_kl,
    "akl": adaptive_kl,
}


def check_kind(kind: str) -> None:
    """Raise ValueError unless `kind` is one of `KINDS`."""
    if kind not in _DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(KINDS)}")


def check_params(beta: float, temperature: float) -> None:
    """Raise ValueError unless beta > 0 and temperature > 0."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_kind_for_weights(kind: str) -> None:
    """Raise ValueError unless `kind` can be estimated from weighted (sampled) targets.

    Weighted targets estimate a sum over the vocabulary, sum_v d(p_v, q_v), term by term.
    AKL is not such a sum: its head/tail split sorts the WHOLE teacher distribution by p and
    weighs FKL against RKL with gaps summed over each part, which a handful of draws does not
    determine (and a ratio of estimates would be biased)."""
    check_kind(kind)
    if kind not in _TERMS:
        raise ValueError(
            f"divergence {kind!r} cannot be trained on sampled (weighted) teacher targets: it "
            "is not a sum of per-token terms (AKL splits the whole sorted teacher distribution "
            f"into head and tail); use one of {', '.join(ELEMENTWISE_KINDS)}, or top-k targets"
        )


def outcome_terms(kind: str, log_p: Tensor, log_q: Tensor, *, beta: float = 1.0) -> Tensor:
    """Per-outcome terms d(p_v, q_v) of an elementwise divergence: [..., K] -> [..., K].

    `outcome_divergence` is their sum over the last dim (every kind but AKL)."""
    check_kind_for_weights(kind)
    lp, lq, p, q = _prepare(log_p, log_q)
    return _TERMS[kind](lp, lq, p, q, beta)


def outcome_divergence(kind: str, log_p: Tensor, log_q: Tensor, *, beta: float = 1.0) -> Tensor:
    """The divergence `kind` between p and q given as log-probs over outcomes [..., K] -> [...].

    `beta` is ToDi's sigmoid sharpness (ignored by the other kinds); skl/srkl use
    `SKEW_LAMBDA`, akl uses `AKL_MU`. Every kind but AKL is the sum of its `outcome_terms`."""
    check_kind(kind)
    if log_p.shape != log_q.shape:
        raise ValueError(f"log_p {tuple(log_p.shape)} and log_q {tuple(log_q.shape)} differ")
    if kind == "akl":
        return adaptive_kl(log_p, log_q)
    return outcome_terms(kind, log_p, log_q, beta=beta).sum(-1)


def sampled_divergence(
    kind: str, log_p: Tensor, log_q: Tensor, weights: Tensor, *, beta: float = 1.0
) -> Tensor:
    """Importance-sampling estimate of a full-vocabulary divergence: [c, k] x 3 -> [c].

        D = sum_v d(p_v, q_v)   is estimated by   D_hat = sum_i w_i * d(p_i, q_i) / p_i

    over the k listed entries i of each row (the teacher is the proposal). log_p [c, k]: the
    teacher's log-probs at the listed ids (normalized over the full vocabulary); log_q [c, k]:
    the student's full-vocabulary log-softmax at the same ids; weights [c, k] >= 0:
    - RS-KD (N draws from p with replacement, distinct ids u drawn c_u times): w_u = c_u / N,
      and E[D_hat] = D exactly, for the value and (alpha detached, draws independent of the
      student) for the gradient;
    - exact head + sampled rest: w_i = p_i on the head (the term is then d_i exactly) and
      w_u = P_rest * c_u / N_rest on the draws from the renormalized rest;
    - w = p over all V ids: D_hat = D exactly.
    Entries with w = 0 are padding: they contribute exactly 0 to the value and the gradient,
    whatever their log-probs. Ids may repeat (each listing is its own term).

    Per kind, with r = log p - log q: the forward side's estimate per unit weight is bounded
    (fkl: w r), the reverse side's carries the importance ratio q / p (rkl: w (q/p)(-r)), formed
    as exp(log w + log q - log p), never by dividing by a small p. No AKL
    (`check_kind_for_weights`)."""
    check_kind_for_weights(kind)
    if not log_p.shape == log_q.shape == weights.shape:
        raise ValueError(
            f"log_p {tuple(log_p.shape)}, log_q {tuple(log_q.shape)} and weights "
            f"{tuple(weights.shape)} must have the same shape"
        )
    lp, lq, _, _ = _prepare(log_p, log_q)
    w = weights.detach().to(lp.dtype)
    listed = w > 0
    # Padding: both log-probs set to 0 (finite, r = 0), so nothing there can make inf or NaN,
    # and the student's value at a padding entry gets exactly zero gradient.
    lp = torch.where(listed, lp, torch.zeros_like(lp))
    lq = torch.where(listed, lq, torch.zeros_like(lq))
    mq = torch.exp(w.log() + lq - lp)  # w q / p; log 0 = -inf gives exactly 0 at padding
    return _TERMS[kind](lp, lq, w, mq, beta).sum(-1)


SAMPLED_ESTIMATORS: Final = ("bucketed", "unbiased")
"""How sampled targets estimate a divergence (docs/method.md, "Sampled targets"):
- "bucketed": the teacher-mass side by importance weights over the listed ids (unbiased), the
  student-mass side exactly over the listed ids plus ONE bucket for the rest of the vocabulary
  (like the top-k + tail form: biased low, low variance);
- "unbiased": both sides by importance weights (`sampled_divergence`)."""


def check_sampled_estimator(name: str) -> None:
    """Raise ValueError unless `name` is one of `SAMPLED_ESTIMATORS`."""
    if name not in SAMPLED_ESTIMATORS:
        raise ValueError(
            f"unknown sampled-target estimator {name!r}; expected one of "
            f"{', '.join(SAMPLED_ESTIMATORS)}"
        )


def bucketed_divergence(
    kind: str,
    log_p: Tensor,
    log_q: Tensor,
    lq_rest: Tensor,
    weights: Tensor,
    *,
    beta: float = 1.0,
    first: Tensor | None = None,
) -> Tensor:
    """Sampled-target estimate with the student side bucketed: [c, k] x 2, [c], [c, k] -> [c].

    Every kind but TVD is d(p, q) = p * a(log p, log q) + q * b(log p, log q) (`_TERMS`):

        D_hat = sum_i w_i a(p_i, q_i)                               teacher-mass side
              + sum_{o in listed ids + rest} q_o b(p_o, q_o)         student-mass side

    The first sum is the importance-sampling estimate of sum_v p_v a_v (unbiased; its weight
    per unit of teacher mass, a, stays bounded where the student overrates a token). The second
    is exact over the listed ids and lumps the rest of the vocabulary into one outcome, the
    teacher's rest P = 1 - sum_listed p (known exactly: the listed log-probs are the teacher's
    own) against the student's rest Q = exp(lq_rest). That lumping is what the top-k + tail
    form does; by the log-sum inequality it can only under-state the student-mass side, but it
    keeps pushing the student's mass off the unlisted ids at every step, which the unbiased
    estimate does only through rare draws of tokens with large q / p. TVD (not linear in the
    masses) is the coarsened value over the listed ids and the rest.

    log_p [c, k]: the teacher's full-vocabulary log-probs at the listed ids; log_q [c, k]: the
    student's at the same ids; lq_rest [c]: the student's log-mass outside the listed ids;
    weights [c, k] >= 0 as in `sampled_divergence` (w = 0: padding, which must repeat a listed
    id of its row or lie outside the ids the rest was computed without). `first` [c, k] bool:
    the listed entries that are the first listing of their id (default: every listed entry,
    i.e. distinct ids); a repeated id keeps one teacher-side term per listing but is one
    student-side outcome and counts once in the teacher's listed mass."""
    check_kind_for_weights(kind)
    if not log_p.shape == log_q.shape == weights.shape or lq_rest.shape != log_q.shape[:-1]:
        raise ValueError(
            f"log_p {tuple(log_p.shape)}, log_q {tuple(log_q.shape)}, weights "
            f"{tuple(weights.shape)} must have the same shape, lq_rest {tuple(lq_rest.shape)} "
            "its rows"
        )
    lp, lq, _, _ = _prepare(log_p, log_q)
    w = weights.detach().to(lp.dtype)
    listed = w > 0
    once = listed if first is None else first & listed
    lp = torch.where(listed, lp, torch.zeros_like(lp))
    lq = torch.where(listed, lq, torch.zeros_like(lq))
    lp_rest = teacher_tail_logprob(torch.where(once, lp, torch.full_like(lp, -math.inf)))
    lp_c = torch.cat([lp, lp_rest[:, None].to(lp.dtype)], dim=1)
    lq_c = torch.cat([lq, lq_rest.to(lp.dtype).clamp_min(_NEG)[:, None]], dim=1)
    on = torch.cat([once, torch.ones_like(listed[:, :1])], dim=1)
    mq_c = torch.where(on, lq_c.exp(), torch.zeros_like(lq_c))
    if kind == "tvd":
        mp_c = torch.where(on, lp_c.exp(), torch.zeros_like(lp_c))
        return _tvd_terms(lp_c, lq_c, mp_c, mq_c, beta).sum(-1)
    terms = _TERMS[kind]
    p_side = terms(lp, lq, w, torch.zeros_like(w), beta).sum(-1)
    q_side = terms(lp_c, lq_c, torch.zeros_like(mq_c), mq_c, beta).sum(-1)
    return p_side + q_side


# --------------------------------------------------------------------------------------------
# Dense form.


def dense_divergence(
    kind: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """Per-position divergence over the full vocabulary: [N, V], [N, V] -> [N].

    p = softmax(teacher / T), q = softmax(student / T), both in float32 (float64 kept). Plain
    autograd: it materializes several [N, V] temporaries (for tests, evaluation and small V).
    """
    check_kind(kind)
    check_params(beta, temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"expected student and teacher logits of the same shape [N, V], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = math_dtype(student_logits.dtype, teacher_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return outcome_divergence(kind, log_p, log_q, beta=beta)


# --------------------------------------------------------------------------------------------
# Sparse form: k teacher ids + one tail bucket.


def teacher_tail_logprob(topk_logprobs: Tensor) -> Tensor:
    """log p_tail = log(1 - sum_k p_k) per row, [N, k] -> [N] (same dtype as the math).

    The sum runs in float64 (no float32 cancellation), and the tail is floored at
    `TEACHER_TAIL_FLOOR`, so top-k masses that sum to 1 (or a hair above, after rounding or a
    lossy codec) give a tiny positive tail, never log(0) or log of a negative number."""
    mass = topk_logprobs.to(torch.float64).exp().sum(-1)
    tail = (1.0 - mass).clamp_min(TEACHER_TAIL_FLOOR)
    return tail.log().to(math_dtype(topk_logprobs.dtype))


def renormalized_topk(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the tail bucket and renormalize both sides over the k ids: [c, k+1] -> [c, k].

        log p'_i = log p_i - logsumexp_k log p,   log q'_i = log q_i - logsumexp_k log q

    What most distillation tools do with stored top-k (axolotl, DistillKit): the divergence
    then sees only how the mass is shared among the teacher's k ids, nothing of what either
    side puts elsewhere. The trainer's `topk_target="renormalized"` (an ablation; the default
    keeps the tail)."""
    lp, lq = log_p[:, :-1], log_q[:, :-1]
    return (
        lp - torch.logsumexp(lp, dim=-1, keepdim=True),
        lq - torch.logsumexp(lq, dim=-1, keepdim=True),
    )


def coarsened_teacher(topk_logprobs: Tensor, lq_tail: Tensor) -> Tensor:
    """Teacher log-probs over (k ids, tail) [c, k+1].

    When the student's tail is exactly empty (the ids cover the vocabulary, or every other entry
    is masked to -inf) the bucket does not exist: the teacher's tail, then only rounding, is set
    to -inf too, so the bucket contributes 0 (this is what makes k = V equal the dense form)."""
    lp_tail = teacher_tail_logprob(topk_logprobs).to(lq_tail.dtype)
    lp_tail = torch.where(torch.isneginf(lq_tail), torch.full_like(lp_tail, -math.inf), lp_tail)
    return torch.cat([topk_logprobs.to(lq_tail.dtype), lp_tail[:, None]], dim=1)
