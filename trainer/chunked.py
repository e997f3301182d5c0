"""The chunking engine: any divergence of `todi.trainer.divergences`, applied to [N, V] logits
(or to hidden states and the output head) without ever holding [N, V] float temporaries whole.

The student's full-vocabulary logits are the dominant memory cost of distillation
([positions, V] float32 is 1.6 GB at 8,192 positions and V = 49,152, and plain autograd keeps
several such tensors alive). Rows are processed `chunk_size` at a time, as Liger's chunked-loss
base does: each chunk's softmax is reduced to per-row statistics (the normalizer, the student's
tail log-mass and G = dD/dlog q over the k + 1 outcomes, from `outcome_divergence` under
autograd), and the logits' gradient is assembled from them in closed form (`_assemble_grad`).

- `sparse_divergence`: from logits [N, V]; backward recomputes each chunk's softmax;
  with `weights` (sampled targets) the outcomes are the k listed ids only (no tail), and the
  gradient is dD/dz_j = (1/T)(sum_{i: id_i = j} G_i - q_j sum_i G_i), accumulated over
  repeated ids;
- `chunked_head_loss`: from the last hidden state and the head, CE + divergence; the gradients
  of hidden and head come chunk by chunk too, either during forward, for the weighting
  `kd_weight` that the caller announces (Liger-style; backward only scales them), or in
  backward by recomputing each chunk's logits (one extra head matmul).
- `reference_sparse_divergence`, `reference_head_loss`: the same quantities in plain autograd
  (the baselines the engine is checked and benchmarked against).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Final, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from todi.storage.batches import IGNORE_INDEX
from todi.trainer.divergences import (
    bucketed_divergence,
    check_kind,
    check_kind_for_weights,
    check_params,
    check_sampled_estimator,
    coarsened_teacher,
    math_dtype,
    outcome_divergence,
    renormalized_topk,
    sampled_divergence,
    teacher_tail_logprob,
)

DEFAULT_CHUNK_SIZE: Final = 1024
"""Positions per chunk: bounds the [chunk, V] float32 temporaries of the sparse/chunked paths."""

# Rows whose student tail mass q_tail is above e^-40 take the fast backward path (one exp per
# logit, the tail term as G_tail / q_tail <= e^40 * |G_tail|); smaller tails take a log-space
# path so nothing overflows.
_FAST_TAIL_LOG: Final = 40.0


def _check_sparse(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, repeats: bool = False
) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be [N, V], got {tuple(student_logits.shape)}")
    _check_topk(topk_ids, topk_logprobs, *student_logits.shape, repeats=repeats)


def _check_topk(
    topk_ids: Tensor, topk_logprobs: Tensor, n: int, v: int, repeats: bool = False
) -> None:
    """topk_ids [n, k] (long, k <= v unless ids may `repeat`) and topk_logprobs alike."""
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            f"expected top-k ids and log-probs of shape [{n}, k], got "
            f"{tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}"
        )
    if topk_ids.dtype != torch.long:
        raise ValueError(f"top-k ids must be int64 (torch.long), got {topk_ids.dtype}")
    if topk_ids.shape[1] > v and not repeats:
        raise ValueError(f"k = {topk_ids.shape[1]} exceeds the vocabulary size {v}")


def _check_weights(
    kind: str,
    weights: Tensor | None,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail: bool,
    sampled: str = "unbiased",
    spread: bool = False,
) -> None:
    """Weighted (sampled) targets: [n, k] like the ids, float, finite, >= 0, with a finite
    teacher log-prob wherever w > 0 (a drawn id has p > 0); an elementwise kind (no AKL); no
    renormalized-top-k ablation (there is no top-k to renormalize)."""
    check_sampled_estimator(sampled)
    if spread and (weights is not None or not tail):
        raise ValueError(
            "spread (the rest of the teacher's mass spread over the unlisted ids) applies to "
            "top-k targets with their tail only: not with weights or tail=False"
        )
    if weights is None:
        return
    check_kind_for_weights(kind)
    if not tail:
        raise ValueError("tail=False (renormalized top-k) does not apply to weighted targets")
    if weights.shape != topk_ids.shape or not weights.is_floating_point():
        raise ValueError(
            f"target weights must be a float tensor shaped like the ids {tuple(topk_ids.shape)}, "
            f"got {weights.dtype} {tuple(weights.shape)}"
        )
    ok = (weights >= 0) & torch.isfinite(weights) & (torch.isfinite(topk_logprobs) | (weights == 0))
    if weights.numel() and not bool(ok.all()):
        raise ValueError(
            "target weights must be finite and >= 0, with a finite teacher log-prob where > 0"
        )


def _spread_teacher(topk_ids: Tensor, topk_logprobs: Tensor, v: int, dtype: torch.dtype) -> Tensor:
    """The teacher over the whole vocabulary [c, V] from its k listed ids: their own log-probs,
    and the rest of the mass, 1 - sum_k p (floored like the tail bucket), spread evenly over the
    V - k other ids (`topk_target="spread"`, docs/method.md)."""
    k = topk_ids.shape[1]
    fill = teacher_tail_logprob(topk_logprobs).to(dtype) - math.log(max(v - k, 1))
    out = fill[:, None].expand(-1, v).clone()
    return out.scatter_(1, topk_ids, topk_logprobs.to(dtype))


def _all_ids(rows: int, v: int, device: torch.device) -> Tensor:
    """Every vocabulary id for each of `rows` rows [rows, V] (an expanded view: no memory)."""
    return torch.arange(v, device=device).expand(rows, v)


def _first_listed(topk_ids: Tensor, weights: Tensor) -> Tensor:
    """[c, k] bool: the listed entries (w > 0) that are the first listing of their id in the
    row: the bucketed estimate's student-side outcomes (a repeated id is one outcome, while
    each of its listings keeps its own teacher-side term)."""
    k = topk_ids.shape[1]
    listed = weights > 0
    pad = -1 - torch.arange(k, device=topk_ids.device)  # distinct, never a real id
    keys, order = torch.where(listed, topk_ids, pad).sort(dim=1, stable=True)
    first_sorted = torch.ones_like(listed)
    first_sorted[:, 1:] = keys[:, 1:] != keys[:, :-1]
    return torch.zeros_like(listed).scatter_(1, order, first_sorted) & listed


def _bucketed_ids(topk_ids: Tensor, weights: Tensor) -> Tensor:
    """The ids with every padding entry (w = 0) set to its row's first listed id [c, k].

    The bucketed estimate needs the student's mass outside the listed ids; a padding entry that
    repeats a listed id removes nothing more from that rest (and is masked as an outcome)."""
    first = (weights > 0).to(torch.uint8).argmax(dim=1, keepdim=True)
    return torch.where(weights > 0, topk_ids, topk_ids.gather(1, first))


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


def _full_student(zt: Tensor, topk_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Student log-probs at the listed ids from logits already divided by T, no tail.

    `zt` [c, V] (owned) is OVERWRITTEN with exp(zt - m) at every entry. Returns (log q at the
    ids [c, k], row normalizer [c, 2] (see `_row_norm`))."""
    z_ids = zt.gather(1, topk_ids)
    norm = _row_norm(zt, scratch=zt)
    lq_ids = (z_ids - norm[:, :1]) - norm[:, 1:]
    return lq_ids, norm


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
    tail: bool = True,
    weights: Tensor | None = None,
    sampled: str = "unbiased",
    spread: bool = False,
) -> _ChunkForward:
    """Divergence of one chunk of rows. `zt` (student logits / T, owned) is overwritten with
    exp(zt - m) (0 at the ids), which `_assemble_grad` can turn into the logits' gradient.

    Besides the logits, the backward needs only the per-row normalizer, log q_tail and G.
    `tail=False`: the divergence of the top-k renormalized on both sides (`renormalized_topk`);
    G over the tail is then 0 and the same gradient assembly applies.
    `weights` [c, k]: the importance-weighted estimate over the listed ids (`sampled_divergence`),
    no tail: G is over the k listed entries only, `zt` becomes exp(zt - m) everywhere (ids
    included) and lq_tail is unused (zeros).
    `sampled="bucketed"` with `weights`: `bucketed_divergence` over (listed ids, rest); the
    outcomes and G are then laid out as in the top-k + tail form (ids from `_bucketed_ids`).
    `spread=True`: the divergence over the whole vocabulary against `_spread_teacher`; G is
    [c, V] over every id (assemble it like weighted targets with `_all_ids`), `zt` becomes
    exp(zt - m) everywhere, lq_ids is the student's full log-softmax [c, V]."""
    if spread:
        rows, v = zt.shape
        log_p = _spread_teacher(topk_ids, topk_logprobs, v, zt.dtype)
        lq_ids, norm = _full_student(zt, _all_ids(rows, v, zt.device))
        lq_tail = lq_ids.new_zeros(rows)
        if not need_grad:
            return _ChunkForward(outcome_divergence(kind, log_p, lq_ids, beta=beta), norm,
                                 lq_tail, lq_ids, None)  # fmt: skip
        with torch.enable_grad():
            leaf = lq_ids.detach().requires_grad_(True)
            div = outcome_divergence(kind, log_p, leaf, beta=beta)
            (grad,) = torch.autograd.grad(div.sum(), leaf)
        return _ChunkForward(div.detach(), norm, lq_tail, lq_ids, grad)
    bucketed = weights is not None and sampled == "bucketed"
    if weights is not None and not bucketed:
        lq_ids, norm = _full_student(zt, topk_ids)
        log_q = lq_ids
        lq_tail = lq_ids.new_zeros(lq_ids.shape[0])
    else:
        lq_ids, lq_tail, norm = _coarsened_student(zt, topk_ids, reload)
        log_q = torch.cat([lq_ids, lq_tail[:, None]], dim=1)
        if not bucketed:
            log_p = coarsened_teacher(topk_logprobs, lq_tail)

    def divergence(lq: Tensor) -> Tensor:
        if bucketed:
            return bucketed_divergence(
                kind, topk_logprobs, lq[:, :-1], lq[:, -1], weights, beta=beta,
                first=_first_listed(topk_ids, weights),
            )  # fmt: skip
        if weights is not None:
            return sampled_divergence(kind, topk_logprobs, lq, weights, beta=beta)
        if tail:
            return outcome_divergence(kind, log_p, lq, beta=beta)
        return outcome_divergence(kind, *renormalized_topk(log_p, lq), beta=beta)

    if not need_grad:
        return _ChunkForward(divergence(log_q), norm, lq_tail, lq_ids, None)
    with torch.enable_grad():
        leaf = log_q.detach().requires_grad_(True)
        div = divergence(leaf)
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
    weighted: bool = False,
    listed: Tensor | None = None,
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

    `weighted`: D depends on log q at the k listed ids only (no tail outcome; G is [c, k], ids
    may repeat): dD/dz_j = (1/T) (sum_{i: id_i = j} G_i - q_j S). e must then hold
    exp(z / T - m) at the ids too; the id terms are ADDED (scatter_add), so repeated ids
    accumulate, and lq_tail, q_ids and reload are unused.
    `listed` [c, k] (bool; the bucketed sampled form): the first listing of each id; every
    other entry repeats an id of its row (padding, G = 0; or a second listing, whose G adds
    up with the first's, as both read the same log q) and must not overwrite its value.
    """
    if weighted:
        scale = div_scale / temperature
        coef = -scale * grad_outcomes.sum(-1)
        if ce_scale is not None and temperature == 1.0:
            coef = coef + ce_scale  # same softmax: fold the CE's dense part in
        grad = e.mul_((coef / norm_t[:, 1].exp())[:, None])
        grad.scatter_add_(1, topk_ids, scale[:, None] * grad_outcomes)
        return _add_ce(grad, temperature, labels, ce_scale, ce_exp, norm_1)
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
    if listed is None:
        grad.scatter_(1, topk_ids, at_ids)
    else:  # repeated ids: write 0 at every id, add each entry's G, then once per id its q terms
        g_part = scale[:, None] * g_ids
        grad.scatter_(1, topk_ids, 0.0)
        grad.scatter_add_(1, topk_ids, g_part)
        q_part = -scale[:, None] * q_ids * total[:, None]
        if ce_scale is not None and temperature == 1.0:
            q_part = q_part + ce_scale[:, None] * q_ids
        grad.scatter_add_(1, topk_ids, torch.where(listed, q_part, torch.zeros_like(q_part)))
    if slow_grad is not None:
        grad.index_add_(0, slow_rows, slow_grad)
    return _add_ce(grad, temperature, labels, ce_scale, ce_exp, norm_1)


def _add_ce(
    grad: Tensor,
    temperature: float,
    labels: Tensor | None,
    ce_scale: Tensor | None,
    ce_exp: Tensor | None,
    norm_1: Tensor | None,
) -> Tensor:
    """The CE's gradient on top of `grad` (its softmax part already folded in when T = 1)."""
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
    weighted: bool = False,
    listed: Tensor | None = None,
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
        weighted=weighted,
        listed=listed,
    )


def _scaled_copy(logits: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
    """A float32 (float64 kept) copy of `logits` (into `out` if given), divided by T."""
    if out is None:
        out = logits.to(math_dtype(logits.dtype), copy=True)
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
        tail: bool,
        weights: Tensor | None,
        sampled: str,
        spread: bool,
    ) -> Tensor:
        n = student_logits.shape[0]
        bucketed = weights is not None and sampled == "bucketed"
        if bucketed:
            topk_ids = _bucketed_ids(topk_ids, weights)
        dtype = math_dtype(student_logits.dtype)
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
                tail,
                None if weights is None else weights[sl],
                sampled,
                spread,
            )
            div[sl], norm[sl], lq_tail[sl] = fwd.div, fwd.norm, fwd.lq_tail
            if fwd.grad is not None and not spread:  # spread: backward recomputes G [c, V]
                grads.append(fwd.grad)
        grad_outcomes = torch.cat(grads) if grads else None
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.spread = (kind, beta, topk_logprobs) if spread else None
        ctx.weighted = weights is not None and not bucketed
        ctx.listed = _first_listed(topk_ids, weights) if bucketed else None
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
            if ctx.spread is not None:
                kind, beta, lps = ctx.spread
                zt = _scaled_copy(student_logits[sl], t, work.get("z", rows))
                fwd = _sparse_chunk_forward(
                    kind,
                    zt,
                    topk_ids[sl],
                    lps[sl],
                    beta,
                    True,
                    None,
                    spread=True,  # type: ignore[arg-type]
                )
                grad[sl] = _assemble_grad(
                    zt,
                    temperature=t,
                    topk_ids=_all_ids(rows, v, zt.device),
                    norm_t=fwd.norm,
                    lq_tail=fwd.lq_tail,
                    grad_outcomes=fwd.grad,  # type: ignore[arg-type]
                    q_ids=fwd.lq_tail,
                    div_scale=grad_div[sl].to(norm.dtype),
                    reload=None,  # type: ignore[arg-type]
                    weighted=True,
                )
                continue
            grad[sl] = _logit_grad(
                _scaled_copy(student_logits[sl], 1.0, work.get("z", rows)),
                temperature=t,
                topk_ids=topk_ids[sl],
                norm_t=norm[sl],
                lq_tail=lq_tail[sl],
                grad_outcomes=grad_outcomes[sl],
                div_scale=grad_div[sl].to(norm.dtype),
                reload=functools.partial(_reload_rows, student_logits[sl], t),
                weighted=ctx.weighted,
                listed=None if ctx.listed is None else ctx.listed[sl],
            )
        return grad, None, None, None, None, None, None, None, None, None, None, None


def sparse_divergence(
    kind: str,
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tail: bool = True,
    weights: Tensor | None = None,
    sampled: str = "unbiased",
    spread: bool = False,
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

    `tail=False`: drop the tail bucket and renormalize both sides over the k ids instead
    (`todi.trainer.divergences.renormalized_topk`, the usual top-k distillation; an ablation).

    `weights` [N, k] (float, >= 0; sampled targets, `Batch.target_weights`): instead, the
    importance-sampling estimate of the FULL-vocabulary divergence with the teacher as the
    proposal, sum_i w_i d(p_i, q_i) / p_i over the listed entries
    (`todi.trainer.divergences.sampled_divergence`): no tail bucket, q from the student's
    full-vocabulary softmax at T, ids may repeat (their gradients add up), w = 0 entries are
    padding (no value, no gradient). Not for AKL (ValueError).
    `sampled="bucketed"` (with `weights`): the teacher-mass side by those importance weights,
    the student-mass side over the listed ids plus one bucket for the rest
    (`todi.trainer.divergences.bucketed_divergence`).
    `spread=True` (top-k targets): instead of one tail bucket, the teacher's rest of the mass
    is spread evenly over the V - k unlisted ids and the divergence runs over the whole
    vocabulary (`_spread_teacher`); backward recomputes it chunk by chunk.
    """
    check_kind(kind)
    check_params(beta, temperature)
    _check_sparse(student_logits, topk_ids, topk_logprobs, repeats=weights is not None)
    _check_weights(kind, weights, topk_ids, topk_logprobs, tail, sampled, spread)
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
        bool(tail),
        None if weights is None else weights.detach(),
        sampled,
        bool(spread),
    )


def reference_sparse_divergence(
    kind: str,
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    tail: bool = True,
    weights: Tensor | None = None,
    sampled: str = "unbiased",
    spread: bool = False,
) -> Tensor:
    """The same quantity as `sparse_divergence` in plain, unchunked autograd.

    It materializes several [N, V] temporaries in forward and backward: the baseline that the
    chunked path is checked and benchmarked against, not for training."""
    check_kind(kind)
    check_params(beta, temperature)
    _check_sparse(student_logits, topk_ids, topk_logprobs, repeats=weights is not None)
    _check_weights(kind, weights, topk_ids, topk_logprobs, tail, sampled, spread)
    zt = student_logits.to(math_dtype(student_logits.dtype)) / temperature
    lse = torch.logsumexp(zt, dim=-1)
    if spread:
        log_p = _spread_teacher(topk_ids, topk_logprobs.detach(), zt.shape[1], zt.dtype)
        return outcome_divergence(kind, log_p, zt - lse[:, None], beta=beta)
    lq_ids = zt.gather(1, topk_ids) - lse[:, None]
    if weights is not None and sampled == "unbiased":
        return sampled_divergence(kind, topk_logprobs.detach(), lq_ids, weights, beta=beta)
    if weights is not None:  # bucketed; the rest: every id but the listed (w > 0) ones
        hits = torch.zeros_like(zt, dtype=torch.int32)
        hits.scatter_add_(1, topk_ids, (weights > 0).to(torch.int32))
        lq_rest = torch.logsumexp(zt.masked_fill(hits > 0, float("-inf")), dim=-1) - lse
        return bucketed_divergence(
            kind, topk_logprobs.detach(), lq_ids, lq_rest, weights, beta=beta,
            first=_first_listed(topk_ids, weights),
        )  # fmt: skip
    masked = zt.scatter(1, topk_ids, float("-inf"))
    lq_tail = torch.logsumexp(masked, dim=-1) - lse
    log_q = torch.cat([lq_ids, lq_tail[:, None]], dim=1)
    log_p = coarsened_teacher(topk_logprobs.detach(), lq_tail.detach())
    if not tail:
        log_p, log_q = renormalized_topk(log_p, log_q)
    return outcome_divergence(kind, log_p, log_q, beta=beta)


class HeadLossParts(NamedTuple):
    """Sums over the counted positions (not means): divide by the global token count."""

    ce_sum: Tensor
    div_sum: Tensor
    n_tokens: int


def _head_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """Float logits of one chunk (into `out` if given; always a buffer the caller may
    overwrite): the matmul in the inputs' common dtype (as the model's own head would run it;
    bf16 stays bf16), then float32 for all the loss math."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    h, w = hidden.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if out is not None and out.dtype == dtype:
        if b is None:
            return torch.mm(h, w.t(), out=out)
        return torch.addmm(b, h, w.t(), out=out)
    logits = F.linear(h, w, b)
    if out is not None:
        return out.copy_(logits)
    return logits.to(math_dtype(logits.dtype))


def _reload_head_rows(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, rows: Tensor
) -> Tensor:
    z = _head_logits(hidden[rows], weight, bias)
    return z.div_(temperature) if temperature != 1.0 else z


def _same_weighting(grad_ce: Tensor, grad_div: Tensor, kd_weight: float) -> Tensor | None:
    """s if (grad_ce, grad_div) == s * (1 - kd_weight, kd_weight) (to rounding), else None."""
    s = grad_ce + grad_div
    tol = 1e-6 * float(s.abs()) + 1e-30
    ok = abs(float(grad_ce - s * (1.0 - kd_weight))) <= tol
    ok = ok and abs(float(grad_div - s * kd_weight)) <= tol
    return s if ok else None


class _ChunkedHeadLoss(torch.autograd.Function):
    """(ce_sum, div_sum) from hidden states and the head, [N, V] never materialized.

    Two ways to the gradient, both chunk by chunk:
    - recompute (always available): forward keeps per-row statistics only; backward recomputes
      each chunk's logits (one extra head matmul) and turns them into the gradients;
    - fused (when `kd_weight` is given): forward already computes the gradients of
      (1 - kd_weight) * ce_sum + kd_weight * div_sum w.r.t. hidden, head weight and bias, as
      Liger's fused linear cross-entropy does, and backward only scales them (3 head matmuls in
      all, like plain autograd). If the incoming gradients are not in that ratio after all,
      backward falls back to recomputing, so the result is right in every case.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        kind: str,
        beta: float,
        temperature: float,
        chunk_size: int,
        need_grad: tuple[bool, bool, bool],
        kd_weight: float | None,
        tail: bool,
        weights: Tensor | None,
        sampled: str,
        spread: bool,
    ) -> tuple[Tensor, Tensor]:
        n, v = hidden.shape[0], weight.shape[0]
        bucketed = weights is not None and sampled == "bucketed"
        if bucketed:
            topk_ids = _bucketed_ids(topk_ids, weights)
        listed = _first_listed(topk_ids, weights) if bucketed else None
        dtype = math_dtype(hidden.dtype, weight.dtype)
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        dev = hidden.device
        any_grad = any(need_grad)
        fused = any_grad and kd_weight is not None
        ce_sum = torch.zeros((), dtype=dtype, device=dev)
        div_sum = torch.zeros((), dtype=dtype, device=dev)
        # Row normalizers (max, log-sum) of z / T and, when T != 1, of z itself (for the CE).
        norm_t = torch.empty(n, 2, dtype=dtype, device=dev)
        norm_1 = torch.empty(n, 2, dtype=dtype, device=dev) if temperature != 1.0 else norm_t
        lq_tail = torch.empty(n, dtype=dtype, device=dev)
        grads = []
        acc = _GradAccumulators(hidden, weight, bias, need_grad) if fused else None
        work = _Workspace(min(chunk_size, n), v, dtype, dev)
        with torch.autocast(dev.type, enabled=False):
            w = weight.to(mm_dtype)
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                h = hidden[sl].to(mm_dtype)
                rows = h.shape[0]
                reload = functools.partial(_reload_head_rows, h, w, bias, temperature)
                z = _head_logits(h, w, bias, work.get("z", rows))
                z_label = z.gather(1, labels[sl, None]).squeeze(1)
                ce_exp = None
                if temperature != 1.0:
                    ce_exp = work.get("scratch", rows)
                    norm_1[sl] = _row_norm(z, ce_exp)  # ce_exp = exp(z - m_1)
                    z.div_(temperature)
                fwd = _sparse_chunk_forward(
                    kind,
                    z,
                    topk_ids[sl],
                    topk_logprobs[sl],
                    beta,
                    any_grad,
                    reload,
                    tail,
                    None if weights is None else weights[sl],
                    sampled,
                    spread,
                )  # z is now exp(z / T - m)
                norm_t[sl], lq_tail[sl] = fwd.norm, fwd.lq_tail
                # CE = logsumexp(z) - z[label] = (m - z[label]) + log-sum.
                ce_sum += ((norm_1[sl, 0] - z_label) + norm_1[sl, 1]).sum()
                div_sum += fwd.div.sum()
                if fwd.grad is not None and not spread:  # spread: recomputed if needed
                    grads.append(fwd.grad)
                if acc is not None:
                    assert fwd.grad is not None and kd_weight is not None
                    gz = _assemble_grad(
                        z,
                        temperature=temperature,
                        topk_ids=_all_ids(rows, v, dev) if spread else topk_ids[sl],
                        norm_t=fwd.norm,
                        lq_tail=fwd.lq_tail,
                        grad_outcomes=fwd.grad,
                        q_ids=fwd.lq_ids.exp(),
                        div_scale=fwd.div.new_full((rows,), kd_weight),
                        reload=reload,
                        labels=labels[sl],
                        ce_scale=fwd.div.new_full((rows,), 1.0 - kd_weight),
                        ce_exp=ce_exp,
                        norm_1=norm_1[sl],
                        weighted=(weights is not None and not bucketed) or spread,
                        listed=None if listed is None else listed[sl],
                    )
                    acc.add(sl, gz, h, w)
        ctx.temperature, ctx.chunk_size, ctx.kd_weight = temperature, chunk_size, kd_weight
        ctx.weighted = weights is not None and not bucketed
        ctx.listed = listed
        ctx.spread = (kind, beta, topk_logprobs) if spread else None
        ctx.fused = acc
        if any_grad:
            grad_outcomes = torch.cat(grads) if grads else lq_tail.new_zeros(0, 1)
            ctx.save_for_backward(
                hidden, weight, bias, labels, topk_ids, norm_t, lq_tail, grad_outcomes, norm_1
            )
        return ce_sum, div_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: Tensor, grad_div: Tensor):  # type: ignore[override]
        hidden, weight, bias, labels, topk_ids, norm_t, lq_tail, grad_outcomes, norm_1 = (
            ctx.saved_tensors
        )
        t, size = ctx.temperature, ctx.chunk_size
        nones = (None,) * 13
        acc: _GradAccumulators | None = ctx.fused
        if acc is not None:
            ctx.fused = None  # once_differentiable: a second backward would need retain_graph
            s = _same_weighting(grad_ce, grad_div, ctx.kd_weight)
            if s is not None:
                return (*acc.result(s), *nones)
        need = tuple(ctx.needs_input_grad[:3])
        acc = _GradAccumulators(hidden, weight, bias, need)
        n = hidden.shape[0]
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        work = _Workspace(min(size, n), weight.shape[0], norm_t.dtype, hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(mm_dtype)
            for start in range(0, n, size):
                sl = slice(start, start + size)
                h = hidden[sl].to(mm_dtype)
                rows = h.shape[0]
                if ctx.spread is not None:
                    gz = _spread_head_grad(
                        ctx, h, w, bias, labels[sl], topk_ids[sl], ctx.spread[2][sl], norm_1[sl],
                        grad_ce, grad_div, work,
                    )  # fmt: skip
                    acc.add(sl, gz, h, w)
                    continue
                gz = _logit_grad(
                    _head_logits(h, w, bias, work.get("z", rows)),
                    temperature=t,
                    topk_ids=topk_ids[sl],
                    norm_t=norm_t[sl],
                    lq_tail=lq_tail[sl],
                    grad_outcomes=grad_outcomes[sl],
                    div_scale=grad_div.to(norm_t.dtype).expand(rows),
                    reload=functools.partial(_reload_head_rows, h, w, bias, t),
                    labels=labels[sl],
                    ce_scale=grad_ce.to(norm_t.dtype).expand(rows),
                    norm_1=norm_1[sl],
                    scratch=work.get("scratch", rows) if t != 1.0 else None,
                    weighted=ctx.weighted,
                    listed=None if ctx.listed is None else ctx.listed[sl],
                )
                acc.add(sl, gz, h, w)
        return (*acc.result(None), *nones)


def _spread_head_grad(
    ctx: object,
    h: Tensor,
    w: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    norm_1: Tensor,
    grad_ce: Tensor,
    grad_div: Tensor,
    work: _Workspace,
) -> Tensor:
    """The recompute backward of one chunk in spread mode: logits, the [c, V] divergence
    gradient again (never stored), then the CE's."""
    kind, beta, _ = ctx.spread  # type: ignore[attr-defined]
    t = ctx.temperature  # type: ignore[attr-defined]
    rows = h.shape[0]
    z = _head_logits(h, w, bias, work.get("z", rows))
    ce_exp = None
    if t != 1.0:
        ce_exp = torch.sub(z, norm_1[:, :1], out=work.get("scratch", rows)).exp_()
        z.div_(t)
    fwd = _sparse_chunk_forward(
        kind,
        z,
        topk_ids,
        topk_logprobs,
        beta,
        True,
        None,
        spread=True,  # type: ignore[arg-type]
    )
    dtype = fwd.norm.dtype
    return _assemble_grad(
        z,
        temperature=t,
        topk_ids=_all_ids(rows, z.shape[1], z.device),
        norm_t=fwd.norm,
        lq_tail=fwd.lq_tail,
        grad_outcomes=fwd.grad,  # type: ignore[arg-type]
        q_ids=fwd.lq_tail,
        div_scale=grad_div.to(dtype).expand(rows),
        reload=None,  # type: ignore[arg-type]
        labels=labels,
        ce_scale=grad_ce.to(dtype).expand(rows),
        ce_exp=ce_exp,
        norm_1=norm_1,
        weighted=True,
    )


class _GradAccumulators:
    """Gradients of hidden [N, H], head weight [V, H] and bias [V], filled chunk by chunk
    from the logits' gradient gz [c, V]: d hidden = gz @ W, d W += gz^T @ h, d b += sum gz.
    The matmuls run in the head's dtype; the head's gradient accumulates in float32."""

    def __init__(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, ...]
    ) -> None:
        acc_dtype = math_dtype(weight.dtype)
        self.mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        self.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        self.hidden = torch.empty_like(hidden) if need[0] else None
        self.weight = (
            torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need[1] else None
        )
        self.bias = (
            torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device)
            if need[2] and bias is not None
            else None
        )

    def add(self, rows: slice, gz: Tensor, h: Tensor, w: Tensor) -> None:
        gz_mm = gz.to(self.mm_dtype)
        if self.hidden is not None:
            if self.hidden.dtype == self.mm_dtype:
                torch.mm(gz_mm, w, out=self.hidden[rows])
            else:
                self.hidden[rows] = gz_mm @ w
        if self.weight is not None:
            if self.mm_dtype == self.weight.dtype:
                self.weight.addmm_(gz_mm.t(), h)
            else:
                self.weight += (gz_mm.t() @ h).to(self.weight.dtype)
        if self.bias is not None:
            self.bias += gz.sum(0).to(self.bias.dtype)

    def result(self, scale: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        out = []
        for grad, dtype in zip((self.hidden, self.weight, self.bias), self.dtypes, strict=True):
            if grad is not None and scale is not None:
                grad = grad.mul_(scale.to(grad.dtype))
            out.append(None if grad is None else grad.to(dtype))
        return out[0], out[1], out[2]


def _check_head(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    repeats: bool = False,
) -> None:
    if hidden.dim() != 2 or head_weight.dim() != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and head weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(head_weight.shape)}"
        )
    n, v = hidden.shape[0], head_weight.shape[0]
    if head_bias is not None and tuple(head_bias.shape) != (v,):
        raise ValueError(f"head bias must be [{v}], got {tuple(head_bias.shape)}")
    if tuple(labels.shape) != (n,) or labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
    _check_topk(topk_ids, topk_logprobs, n, v, repeats=repeats)


def chunked_head_loss(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    kind: str = "todi",
    beta: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    kd_weight: float | None = None,
    tail: bool = True,
    weights: Tensor | None = None,
    sampled: str = "unbiased",
    spread: bool = False,
) -> HeadLossParts:
    """Summed CE and sparse divergence of the student's head, without [N, V] logits.

    hidden [N, H]: the student's last hidden state at N positions (already normed);
    head_weight [V, H], head_bias [V] or None: the output head, logits = hidden @ W^T + b;
    labels [N] (long): next-token ids, `ignore_index` for positions that do not count;
    topk_ids / topk_logprobs [N, k]: the teacher's cached top-k at `temperature`.

        ce_sum  = sum_n  -log softmax(z_n)[labels_n]                     (T = 1, as in SFT)
        div_sum = sum_n  D_kind(p_n || softmax(z_n / T)) over (k ids + tail)  (`sparse_divergence`)
        n_tokens = number of counted positions

    Sums, not means: the caller divides by the global token count (`distillation_loss`).

    Logits are computed `chunk_size` rows at a time (a custom autograd Function), so the
    [N, V] logits never exist at once, in forward or backward:
    - `kd_weight=None`: backward recomputes each chunk's logits (4 head matmuls in all);
    - `kd_weight=w` (what the caller will pass to `distillation_loss`): forward computes the
      gradients of (1 - w) * ce_sum + w * div_sum chunk by chunk, as Liger's fused linear
      cross-entropy does, and backward only scales them (3 head matmuls, like plain autograd;
      the gradients of hidden and head are held from forward to backward). Any other weighting
      of the two sums still gets the right gradient: backward then recomputes.
    `tail=False`: the divergence of the top-k renormalized on both sides, no tail bucket
    (`todi.trainer.divergences.renormalized_topk`; an ablation, see `sparse_divergence`).
    `weights` [N, k]: sampled targets, the importance-weighted full-vocabulary estimate instead
    of the tail bucket (see `sparse_divergence`; `Batch.target_weights` at the counted rows),
    with `sampled` choosing the estimator (`todi.trainer.divergences.SAMPLED_ESTIMATORS`).
    `spread=True`: the teacher's rest spread over the unlisted ids, no bucket (see
    `sparse_divergence`).
    The head matmul runs in the inputs' common dtype (bf16 stays bf16, like the model's own
    head); all softmax / divergence math is float32 and the head's gradient is accumulated in
    float32. Autocast is switched off inside (the dtype rule above decides).
    """
    check_kind(kind)
    check_params(beta, temperature)
    _check_head(
        hidden, head_weight, head_bias, labels, topk_ids, topk_logprobs, weights is not None
    )
    _check_weights(kind, weights, topk_ids, topk_logprobs, tail, sampled, spread)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if kd_weight is not None and not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight}")
    counted = labels != ignore_index
    n_tokens = int(counted.sum())
    if n_tokens != labels.shape[0]:
        # Select the counted rows outside the Function: autograd scatters their gradient back.
        idx = counted.nonzero().squeeze(1)
        hidden, labels = hidden[idx], labels[idx]
        topk_ids, topk_logprobs = topk_ids[idx], topk_logprobs[idx]
        weights = None if weights is None else weights[idx]
    v = head_weight.shape[0]
    if n_tokens and (int(labels.min()) < 0 or int(labels.max()) >= v):
        raise ValueError(f"labels must lie in [0, {v}) or equal {ignore_index}")
    grad_on = torch.is_grad_enabled()
    need_grad = (
        grad_on and hidden.requires_grad,
        grad_on and head_weight.requires_grad,
        grad_on and head_bias is not None and head_bias.requires_grad,
    )
    ce_sum, div_sum = _ChunkedHeadLoss.apply(
        hidden,
        head_weight,
        head_bias,
        labels,
        topk_ids,
        topk_logprobs.detach(),
        kind,
        float(beta),
        float(temperature),
        int(chunk_size),
        need_grad,
        None if kd_weight is None else float(kd_weight),
        bool(tail),
        None if weights is None else weights.detach(),
        sampled,
        bool(spread),
    )
    return HeadLossParts(ce_sum, div_sum, n_tokens)


def reference_head_loss(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    kind: str = "todi",
    beta: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    tail: bool = True,
    weights: Tensor | None = None,
    sampled: str = "unbiased",
    spread: bool = False,
) -> HeadLossParts:
    """The same sums as `chunked_head_loss` the naive way: full [N, V] logits, plain autograd.

    The baseline for tests and `bench/bench_loss.py`; not for training."""
    counted = labels != ignore_index
    idx = counted.nonzero().squeeze(1)
    logits = F.linear(hidden[idx], head_weight, head_bias)
    logits = logits.to(math_dtype(logits.dtype))
    ce_sum = F.cross_entropy(logits, labels[idx], reduction="sum")
    div = reference_sparse_divergence(
        kind,
        logits,
        topk_ids[idx],
        topk_logprobs[idx],
        beta=beta,
        temperature=temperature,
        tail=tail,
        weights=None if weights is None else weights[idx],
        sampled=sampled,
        spread=spread,
    )
    return HeadLossParts(ce_sum, div.sum(), int(idx.numel()))
