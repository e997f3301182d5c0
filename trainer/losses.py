"""Divergences between a teacher distribution p and a student distribution q.

The math is `docs/method.md`. Everything is built on one core,
`outcome_divergence(kind, log_p, log_q)`, over a distribution on a finite set of *outcomes*:

- dense (`dense_divergence`): the outcomes are the vocabulary entries,
  log p = log_softmax(teacher / T), log q = log_softmax(student / T);
- sparse (`sparse_divergence`): the outcomes are the teacher's k cached ids plus one tail
  bucket holding the rest of the vocabulary (the *coarsened* distributions):
      log p = [stored top-k log-probs, log(1 - sum_k p_k)]
      log q = [log q at the k ids,     logsumexp(student / T over the other ids) - logsumexp(all)]
  Neither side is renormalized over the top-k and the tail is never dropped: that keeps the
  reverse-KL pressure on tokens the student overrates outside the teacher's top-k.

So every divergence has exactly one implementation (a small pure function below), and the
sparse form equals the dense form when k = V.

Conventions shared by all divergences (rows = positions, last dim = outcomes):
- inputs are log-probabilities; math runs in float32 (float64 stays float64);
- an outcome with probability 0 on both sides (log-prob -inf, e.g. a masked vocabulary entry)
  contributes exactly 0 and gets a zero gradient: -inf is replaced by the finite `_NEG`
  (-1e30) first, whose exp is exactly 0 and whose differences are exactly 0, so no inf - inf
  or 0 * inf appears anywhere (no NaN, in values or gradients). A support mismatch (p > 0
  where q = 0) gives a huge finite value (about p * 1e30) instead of +inf;
- the teacher is a constant: only the student side is meant to be differentiated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Final, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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

DEFAULT_CHUNK_SIZE: Final = 1024
"""Positions per chunk: bounds the [chunk, V] float32 temporaries of the sparse/chunked paths."""

_NEG: Final = -1e30
# Rows whose student tail mass q_tail is above e^-40 take the fast backward path (one exp per
# logit, the tail term as G_tail / q_tail <= e^40 * |G_tail|); smaller tails take a log-space
# path so nothing overflows.
_FAST_TAIL_LOG: Final = 40.0
_LOG2: Final = math.log(2.0)


# --------------------------------------------------------------------------------------------
# The divergences over outcomes. Each takes log p (teacher) and log q (student), shape [..., K],
# each a normalized distribution over the K outcomes, and returns the per-row value [...].


def _math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when an input is float64 (bf16/fp16 are promoted to float32)."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _prepare(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cast to the math dtype and replace -inf by `_NEG`; returns (log p, log q, p, q)."""
    dtype = _math_dtype(log_p.dtype, log_q.dtype)
    # clamp_min has gradient 0 at the clamped (-inf) entries and 1 elsewhere.
    lp = log_p.to(dtype).clamp_min(_NEG)
    lq = log_q.to(dtype).clamp_min(_NEG)
    return lp, lq, lp.exp(), lq.exp()


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Forward KL: FKL(p || q) = sum_v p_v (log p_v - log q_v)."""
    lp, lq, p, _ = _prepare(log_p, log_q)
    return (p * (lp - lq)).sum(-1)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Reverse KL: RKL = KL(q || p) = sum_v q_v (log q_v - log p_v)."""
    lp, lq, _, q = _prepare(log_p, log_q)
    return (q * (lq - lp)).sum(-1)


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
    r = lp - lq
    alpha = torch.sigmoid(beta * r).detach()
    return (alpha * p * r - (1.0 - alpha) * q * r).sum(-1)


def js_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen-Shannon: JS = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2.

    log m = logaddexp(log p, log q) - log 2 is exact in log space (the reference code adds 1e-9
    inside the logs instead; the difference is below 1e-8 on the golden example)."""
    lp, lq, p, q = _prepare(log_p, log_q)
    lm = torch.logaddexp(lp, lq) - _LOG2
    return 0.5 * (p * (lp - lm) + q * (lq - lm)).sum(-1)


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance: TVD = 1/2 sum_v |p_v - q_v|."""
    _, _, p, q = _prepare(log_p, log_q)
    return 0.5 * (p - q).abs().sum(-1)


def skewed_forward_kl(log_p: Tensor, log_q: Tensor, *, skew: float = SKEW_LAMBDA) -> Tensor:
    """Skewed forward KL (DistiLLM; ToDi reference code): SKL = KL(p || lam p + (1 - lam) q).

    The mixture is formed in log space: log m = logaddexp(log lam + log p, log(1-lam) + log q).
    """
    lp, lq, p, _ = _prepare(log_p, log_q)
    lm = torch.logaddexp(lp + math.log(skew), lq + math.log1p(-skew))
    return (p * (lp - lm)).sum(-1)


def skewed_reverse_kl(log_p: Tensor, log_q: Tensor, *, skew: float = SKEW_LAMBDA) -> Tensor:
    """Skewed reverse KL (DistiLLM; ToDi reference code): SRKL = KL(q || (1 - lam) p + lam q)."""
    lp, lq, _, q = _prepare(log_p, log_q)
    lm = torch.logaddexp(lp + math.log1p(-skew), lq + math.log(skew))
    return (q * (lq - lm)).sum(-1)


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


def _check_params(beta: float, temperature: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def outcome_divergence(kind: str, log_p: Tensor, log_q: Tensor, *, beta: float = 1.0) -> Tensor:
    """The divergence `kind` between p and q given as log-probs over outcomes [..., K] -> [...].

    `beta` is ToDi's sigmoid sharpness (ignored by the other kinds); skl/srkl use
    `SKEW_LAMBDA`, akl uses `AKL_MU`."""
    check_kind(kind)
    if log_p.shape != log_q.shape:
        raise ValueError(f"log_p {tuple(log_p.shape)} and log_q {tuple(log_q.shape)} differ")
    if kind == "todi":
        return todi(log_p, log_q, beta=beta)
    return _DIVERGENCES[kind](log_p, log_q)


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
    _check_params(beta, temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"expected student and teacher logits of the same shape [N, V], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = _math_dtype(student_logits.dtype, teacher_logits.dtype)
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
    return tail.log().to(_math_dtype(topk_logprobs.dtype))


def _check_sparse(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be [N, V], got {tuple(student_logits.shape)}")
    n, v = student_logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            f"expected top-k ids and log-probs of shape [{n}, k], got "
            f"{tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}"
        )
    if topk_ids.dtype != torch.long:
        raise ValueError(f"top-k ids must be int64 (torch.long), got {topk_ids.dtype}")
    if topk_ids.shape[1] > v:
        raise ValueError(f"k = {topk_ids.shape[1]} exceeds the vocabulary size {v}")


class _Workspace:
    """Reusable [rows, V] float buffers, allocated on first use and sliced per chunk.

    One allocation per call instead of one per chunk: every fresh multi-megabyte tensor costs
    page faults (and, with glibc, an mmap/munmap pair), which is a measurable share of a
    memory-bound softmax pass."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        self._shape, self._dtype, self._device = (rows, cols), dtype, device
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, rows: int) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None:
            buf = torch.empty(self._shape, dtype=self._dtype, device=self._device)
            self._buffers[name] = buf
        return buf[:rows]


def _row_norm(x: Tensor, scratch: Tensor | None = None) -> Tensor:
    """Softmax normalizer of each row as [c, 2] = (max m, log sum_j exp(x_j - m)).

    logsumexp = m + log-sum, but they are kept apart: with logits of 1e4, float32 cannot hold
    m + log-sum to better than ~1e-3, while x - m and log-sum are both exact enough. A row with
    no finite entry gets m = 0 (not -inf, which would give -inf - -inf). `scratch` (same shape
    as x) receives the exponentials if given."""
    m = x.amax(dim=-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    log_s = torch.sub(x, m[:, None], out=scratch).exp_().sum(-1).log_()
    return torch.stack([m, log_s], dim=1)


def _coarsened_student(
    zt: Tensor, topk_ids: Tensor, reload: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Student log-probs over (k ids, tail) from logits already divided by T.

    `zt` [c, V] is a float buffer owned by the caller and is OVERWRITTEN (it becomes the
    exponentials): one max pass, one exp pass and two sums give both the full normalizer and the
    sum over the non-id entries, the latter summed directly over those entries (never as
    1 - sum of the top-k, which cancels). Rows whose whole tail underflows in that shared exp
    (tail mass below about e^-87 of the top logit) are redone exactly from `reload(rows)`
    (fresh logits / T for those rows) with the ids masked to -inf.

    Returns (log q at the ids [c, k], log q_tail [c], row normalizer [c, 2] (see `_row_norm`)).
    """
    m = zt.amax(dim=-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z_ids = zt.gather(1, topk_ids)
    e = zt.sub_(m[:, None]).exp_()
    log_s = e.sum(-1).log_()
    e.scatter_(1, topk_ids, 0.0)
    log_s_tail = e.sum(-1).log_()
    under = torch.isneginf(log_s_tail)
    if bool(under.any()):
        rows = under.nonzero().squeeze(1)
        redo = reload(rows).scatter_(1, topk_ids[rows], -math.inf).sub_(m[rows, None])
        log_s_tail[rows] = torch.logsumexp(redo, dim=-1)  # -inf only if the tail is truly empty
    lq_ids = (z_ids - m[:, None]) - log_s[:, None]
    return lq_ids, log_s_tail - log_s, torch.stack([m, log_s], dim=1)


def _coarsened_teacher(topk_logprobs: Tensor, lq_tail: Tensor) -> Tensor:
    """Teacher log-probs over (k ids, tail) [c, k+1].

    When the student's tail is exactly empty (the ids cover the vocabulary, or every other entry
    is masked to -inf) the bucket does not exist: the teacher's tail, then only rounding, is set
    to -inf too, so the bucket contributes 0 (this is what makes k = V equal the dense form)."""
    lp_tail = teacher_tail_logprob(topk_logprobs).to(lq_tail.dtype)
    lp_tail = torch.where(torch.isneginf(lq_tail), torch.full_like(lp_tail, -math.inf), lp_tail)
    return torch.cat([topk_logprobs.to(lq_tail.dtype), lp_tail[:, None]], dim=1)


class _ChunkForward(NamedTuple):
    div: Tensor  # [c] divergence per row
    norm: Tensor  # [c, 2] row normalizer of z / T (`_row_norm`)
    lq_tail: Tensor  # [c] log q_tail
    lq_ids: Tensor  # [c, k] log q at the ids
    grad: Tensor | None  # [c, k+1] G = dD / d log q over the outcomes (ids, tail)


def _sparse_chunk_forward(
    kind: str,
    zt: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    beta: float,
    need_grad: bool,
    reload: Callable[[Tensor], Tensor],
) -> _ChunkForward:
    """Divergence of one chunk of rows. `zt` (student logits / T, owned) is overwritten with
    exp(zt - m) (0 at the ids), which `_assemble_grad` can turn into the logits' gradient.

    Besides the logits, the backward needs only the per-row normalizer, log q_tail and G."""
    lq_ids, lq_tail, norm = _coarsened_student(zt, topk_ids, reload)
    log_q = torch.cat([lq_ids, lq_tail[:, None]], dim=1)
    log_p = _coarsened_teacher(topk_logprobs, lq_tail)
    if not need_grad:
        div = outcome_divergence(kind, log_p, log_q, beta=beta)
        return _ChunkForward(div, norm, lq_tail, lq_ids, None)
    with torch.enable_grad():
        leaf = log_q.detach().requires_grad_(True)
        div = outcome_divergence(kind, log_p, leaf, beta=beta)
        (grad,) = torch.autograd.grad(div.sum(), leaf)
    return _ChunkForward(div.detach(), norm, lq_tail, lq_ids, grad)


def _assemble_grad(
    e: Tensor,
    *,
    temperature: float,
    topk_ids: Tensor,
    norm_t: Tensor,
    lq_tail: Tensor,
    grad_outcomes: Tensor,
    q_ids: Tensor,
    div_scale: Tensor,
    reload: Callable[[Tensor], Tensor],
    labels: Tensor | None = None,
    ce_scale: Tensor | None = None,
    ce_exp: Tensor | None = None,
    norm_1: Tensor | None = None,
) -> Tensor:
    """Gradient w.r.t. the raw logits z [c, V] of sum_rows div_scale * D (+ ce_scale * CE).

    With q = softmax(z / T) = e / exp(log-sum), G_o = dD / d log q_o over the outcomes (ids,
    tail) and S = sum_o G_o:
        dD / dz_j = (1/T) * ( G_id(j)                  if j is a top-k id
                              G_tail * q_j / q_tail    otherwise
                              - q_j * S )
    and for the cross-entropy at T = 1 on `labels`: dCE / dz_j = softmax(z)_j - [j == label].

    e [c, V]: exp(z / T - m) (`norm_t` = (m, log-sum)), values at the ids ignored; it is
    overwritten and returned as the gradient. q_ids [c, k]: q at the ids. ce_exp: exp(z - m_1)
    (`norm_1`), needed for the CE when T != 1, overwritten. reload(rows): fresh z / T rows,
    for rows whose tail mass is below e^-40 (done in log space there).
    """
    k = topk_ids.shape[1]
    g_ids, g_tail = grad_outcomes[:, :k], grad_outcomes[:, k]
    scale = div_scale / temperature
    m, log_s = norm_t[:, 0], norm_t[:, 1]
    # G_tail / q_tail, computed directly only where q_tail > e^-40 (no overflow).
    fast = lq_tail > -_FAST_TAIL_LOG
    ratio = torch.where(
        fast, g_tail * torch.exp(-lq_tail.clamp_min(-_FAST_TAIL_LOG)), torch.zeros_like(g_tail)
    )
    slow = ~fast & (g_tail != 0) & torch.isfinite(lq_tail)
    slow_rows = slow.nonzero().squeeze(1) if bool(slow.any()) else None
    slow_grad = None
    if slow_rows is not None:
        # log space: exp(z_j/T - logsumexp over the tail) at the non-id entries (0 at the ids).
        zr = reload(slow_rows).scatter_(1, topk_ids[slow_rows], -math.inf)
        log_s_tail = (lq_tail + log_s)[slow_rows]
        zr.sub_(m[slow_rows, None]).sub_(log_s_tail[:, None]).exp_()
        slow_grad = zr.mul_((g_tail * scale)[slow_rows, None])
    total = grad_outcomes.sum(-1)
    # At the ids the value is WRITTEN, not corrected by adding: subtracting the tail term
    # G_tail q_j / q_tail there again would cancel catastrophically when q_tail is small.
    at_ids = scale[:, None] * (g_ids - q_ids * total[:, None])
    coef = scale * (ratio - total)
    if ce_scale is not None and temperature == 1.0:
        coef = coef + ce_scale  # same softmax: fold the CE's dense part in
        at_ids = at_ids + ce_scale[:, None] * q_ids
    # q_j = e_j / exp(log-sum): the 1 / exp(log-sum) rides on the per-row coefficient.
    grad = e.mul_((coef / log_s.exp())[:, None])
    grad.scatter_(1, topk_ids, at_ids)
    if slow_grad is not None:
        grad.index_add_(0, slow_rows, slow_grad)
    if ce_scale is not None:
        assert labels is not None
        if temperature != 1.0:
            assert ce_exp is not None and norm_1 is not None
            grad.add_(ce_exp.mul_((ce_scale / norm_1[:, 1].exp())[:, None]))
        grad.scatter_add_(1, labels[:, None], -ce_scale[:, None])
    return grad


def _logit_grad(
    z: Tensor,
    *,
    temperature: float,
    topk_ids: Tensor,
    norm_t: Tensor,
    lq_tail: Tensor,
    grad_outcomes: Tensor,
    div_scale: Tensor,
    reload: Callable[[Tensor], Tensor],
    labels: Tensor | None = None,
    ce_scale: Tensor | None = None,
    norm_1: Tensor | None = None,
    scratch: Tensor | None = None,
) -> Tensor:
    """`_assemble_grad` from fresh raw logits z [c, V] (owned, overwritten, returned as the
    gradient): the backward's recomputation path. `scratch` (like z) holds the CE's
    exponentials when T != 1."""
    ce_exp = None
    if ce_scale is not None and temperature != 1.0:
        assert norm_1 is not None
        ce_exp = torch.sub(z, norm_1[:, :1], out=scratch).exp_()
    if temperature != 1.0:
        z.div_(temperature)
    m, log_s = norm_t[:, :1], norm_t[:, 1:]
    q_ids = ((z.gather(1, topk_ids) - m) - log_s).exp_()
    return _assemble_grad(
        z.sub_(m).exp_(),
        temperature=temperature,
        topk_ids=topk_ids,
        norm_t=norm_t,
        lq_tail=lq_tail,
        grad_outcomes=grad_outcomes,
        q_ids=q_ids,
        div_scale=div_scale,
        reload=reload,
        labels=labels,
        ce_scale=ce_scale,
        ce_exp=ce_exp,
        norm_1=norm_1,
    )


def _scaled_copy(logits: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
    """A float32 (float64 kept) copy of `logits` (into `out` if given), divided by T."""
    if out is None:
        out = logits.to(_math_dtype(logits.dtype), copy=True)
    else:
        out.copy_(logits)
    return out.div_(temperature) if temperature != 1.0 else out


def _reload_rows(logits: Tensor, temperature: float, rows: Tensor) -> Tensor:
    return _scaled_copy(logits[rows], temperature)


class _SparseDivergence(torch.autograd.Function):
    """Chunked sparse divergence; backward recomputes each chunk's softmax from the logits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        kind: str,
        beta: float,
        temperature: float,
        chunk_size: int,
        need_grad: bool,
    ) -> Tensor:
        n = student_logits.shape[0]
        dtype = _math_dtype(student_logits.dtype)
        div = torch.empty(n, dtype=dtype, device=student_logits.device)
        norm = torch.empty(n, 2, dtype=dtype, device=student_logits.device)
        lq_tail = torch.empty_like(div)
        v = student_logits.shape[1]
        work = _Workspace(min(chunk_size, n), v, dtype, student_logits.device)
        grads = []
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            chunk = student_logits[sl]
            fwd = _sparse_chunk_forward(
                kind,
                _scaled_copy(chunk, temperature, work.get("z", chunk.shape[0])),
                topk_ids[sl],
                topk_logprobs[sl],
                beta,
                need_grad,
                functools.partial(_reload_rows, chunk, temperature),
            )
            div[sl], norm[sl], lq_tail[sl] = fwd.div, fwd.norm, fwd.lq_tail
            if fwd.grad is not None:
                grads.append(fwd.grad)
        grad_outcomes = torch.cat(grads) if grads else None
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        if need_grad:
            ctx.save_for_backward(student_logits, topk_ids, norm, lq_tail, grad_outcomes)
        return div

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_div: Tensor):  # type: ignore[override]
        student_logits, topk_ids, norm, lq_tail, grad_outcomes = ctx.saved_tensors
        t, size = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(student_logits)
        n, v = student_logits.shape
        work = _Workspace(min(size, n), v, norm.dtype, student_logits.device)
        for start in range(0, n, size):
            sl = slice(start, start + size)
            rows = student_logits[sl].shape[0]
            grad[sl] = _logit_grad(
                _scaled_copy(student_logits[sl], 1.0, work.get("z", rows)),
                temperature=t,
                topk_ids=topk_ids[sl],
                norm_t=norm[sl],
                lq_tail=lq_tail[sl],
                grad_outcomes=grad_outcomes[sl],
                div_scale=grad_div[sl].to(norm.dtype),
                reload=functools.partial(_reload_rows, student_logits[sl], t),
            )
        return grad, None, None, None, None, None, None, None


def sparse_divergence(
    kind: str,
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Per-position divergence between the coarsened (k + 1)-outcome distributions -> [N].

    student_logits [N, V] (any float dtype; divided by `temperature`), topk_ids [N, k] (long,
    distinct per row), topk_logprobs [N, k]: the teacher's log-probs at `temperature`,
    normalized over the FULL vocabulary (as stored in the shards; finite). Outcomes: the k ids
    plus one tail bucket (see the module docstring). The student's tail log-mass is
    logsumexp(student/T without the ids) - logsumexp(student/T); the teacher's is
    log(1 - sum_k p_k), floored at `TEACHER_TAIL_FLOOR`. Per outcome, ToDi's weight is
    sigmoid(beta * (log p - log q)), detached; the tail bucket gets its own weight.

    Memory: rows are processed `chunk_size` at a time, in forward and in backward (which
    recomputes the chunk's softmax), so at most a few [chunk_size, V] float temporaries live
    at once besides the input and its gradient. Gradients flow to `student_logits` only.
    """
    check_kind(kind)
    _check_params(beta, temperature)
    _check_sparse(student_logits, topk_ids, topk_logprobs)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _SparseDivergence.apply(
        student_logits,
        topk_ids,
        topk_logprobs.detach(),
        kind,
        float(beta),
        float(temperature),
        int(chunk_size),
        need_grad,
    )


def reference_sparse_divergence(
    kind: str,
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """The same quantity as `sparse_divergence` in plain, unchunked autograd.

    It materializes several [N, V] temporaries in forward and backward: the baseline that the
    chunked path is checked and benchmarked against, not for training."""
    check_kind(kind)
    _check_params(beta, temperature)
    _check_sparse(student_logits, topk_ids, topk_logprobs)
    zt = student_logits.to(_math_dtype(student_logits.dtype)) / temperature
    lse = torch.logsumexp(zt, dim=-1)
    lq_ids = zt.gather(1, topk_ids) - lse[:, None]
    masked = zt.scatter(1, topk_ids, float("-inf"))
    lq_tail = torch.logsumexp(masked, dim=-1) - lse
    log_q = torch.cat([lq_ids, lq_tail[:, None]], dim=1)
    log_p = _coarsened_teacher(topk_logprobs.detach(), lq_tail.detach())
    return outcome_divergence(kind, log_p, log_q, beta=beta)
