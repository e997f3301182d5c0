"""The training objective on the output head: chunked CE + sparse divergence, global-mean loss.

The student's full-vocabulary logits are the dominant memory cost of distillation
([positions, V] float32 is 1.6 GB at 8,192 positions and V = 49,152, and plain autograd keeps
several such tensors alive). `chunked_head_loss` never holds more than one chunk of them: it
takes the last hidden state and the output head, computes logits `chunk_size` rows at a time,
keeps only per-row statistics (a few floats per row plus dD/dlog q over the k + 1 outcomes),
and gets the gradients of the hidden state and of the head chunk by chunk too: either during
forward, for the weighting `kd_weight` that the caller announces (Liger-style; backward only
scales them), or in backward by recomputing each chunk's logits (one extra head matmul).
Nothing of size [N, V] is ever saved.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from todi.storage.batches import IGNORE_INDEX
from todi.trainer.losses import (
    DEFAULT_CHUNK_SIZE,
    _assemble_grad,
    _check_params,
    _logit_grad,
    _math_dtype,
    _row_norm,
    _sparse_chunk_forward,
    _Workspace,
    check_kind,
    reference_sparse_divergence,
)


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
    return logits.to(_math_dtype(logits.dtype))


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
    ) -> tuple[Tensor, Tensor]:
        n, v = hidden.shape[0], weight.shape[0]
        dtype = _math_dtype(hidden.dtype, weight.dtype)
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
                    kind, z, topk_ids[sl], topk_logprobs[sl], beta, any_grad, reload
                )  # z is now exp(z / T - m)
                norm_t[sl], lq_tail[sl] = fwd.norm, fwd.lq_tail
                # CE = logsumexp(z) - z[label] = (m - z[label]) + log-sum.
                ce_sum += ((norm_1[sl, 0] - z_label) + norm_1[sl, 1]).sum()
                div_sum += fwd.div.sum()
                if fwd.grad is not None:
                    grads.append(fwd.grad)
                if acc is not None:
                    assert fwd.grad is not None and kd_weight is not None
                    gz = _assemble_grad(
                        z,
                        temperature=temperature,
                        topk_ids=topk_ids[sl],
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
                    )
                    acc.add(sl, gz, h, w)
        ctx.temperature, ctx.chunk_size, ctx.kd_weight = temperature, chunk_size, kd_weight
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
        nones = (None,) * 9
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
                )
                acc.add(sl, gz, h, w)
        return (*acc.result(None), *nones)


class _GradAccumulators:
    """Gradients of hidden [N, H], head weight [V, H] and bias [V], filled chunk by chunk
    from the logits' gradient gz [c, V]: d hidden = gz @ W, d W += gz^T @ h, d b += sum gz.
    The matmuls run in the head's dtype; the head's gradient accumulates in float32."""

    def __init__(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, ...]
    ) -> None:
        acc_dtype = _math_dtype(weight.dtype)
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
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            f"expected top-k ids and log-probs of shape [{n}, k], got "
            f"{tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}"
        )
    if topk_ids.dtype != torch.long:
        raise ValueError(f"top-k ids must be int64 (torch.long), got {topk_ids.dtype}")
    if topk_ids.shape[1] > v:
        raise ValueError(f"k = {topk_ids.shape[1]} exceeds the vocabulary size {v}")


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
    The head matmul runs in the inputs' common dtype (bf16 stays bf16, like the model's own
    head); all softmax / divergence math is float32 and the head's gradient is accumulated in
    float32. Autocast is switched off inside (the dtype rule above decides).
    """
    check_kind(kind)
    _check_params(beta, temperature)
    _check_head(hidden, head_weight, head_bias, labels, topk_ids, topk_logprobs)
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
) -> HeadLossParts:
    """The same sums as `chunked_head_loss` the naive way: full [N, V] logits, plain autograd.

    The baseline for tests and `bench/bench_loss.py`; not for training."""
    counted = labels != ignore_index
    idx = counted.nonzero().squeeze(1)
    logits = F.linear(hidden[idx], head_weight, head_bias)
    logits = logits.to(_math_dtype(logits.dtype))
    ce_sum = F.cross_entropy(logits, labels[idx], reduction="sum")
    div = reference_sparse_divergence(
        kind, logits, topk_ids[idx], topk_logprobs[idx], beta=beta, temperature=temperature
    )
    return HeadLossParts(ce_sum, div.sum(), int(idx.numel()))


def distillation_loss(
    ce_sum: Tensor, div_sum: Tensor, num_tokens_global: float, kd_weight: float = 0.5
) -> Tensor:
    """((1 - kd_weight) * ce_sum + kd_weight * div_sum) / num_tokens_global.

    The objective is the mean over the response tokens of the GLOBAL batch (all workers, all
    gradient-accumulation micro-batches of one optimizer step), not a mean of per-sequence or
    per-worker means. Each micro-batch on each worker contributes its SUMS (from
    `chunked_head_loss`, best called with the same `kd_weight`) divided by one common
    denominator; what to pass as `num_tokens_global`:

    - one process: the token count summed over the step's accumulation micro-batches;
    - DDP (its all-reduce AVERAGES gradients over the W workers): that global count divided by
      W, i.e. `loss_denominator(local_count)` = `global_token_count(local_count) / world_size`,
      where `local_count` is this worker's count summed over its accumulation micro-batches.
      Then sum over micro-batches, then average over workers, of grad(sums_i / (N_global / W))
      = grad(sum of all sums / N_global): exactly the gradient of the global mean.
      (The per-worker loss VALUE is then W times its share; to log the global mean, all-reduce
      the sums and divide by the global count.)

    A step with no counted token anywhere (`num_tokens_global == 0`) gives 0 (and zero
    gradients) instead of 0 / 0.
    """
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight}")
    if num_tokens_global < 0:
        raise ValueError(f"num_tokens_global must be >= 0, got {num_tokens_global}")
    total = (1.0 - kd_weight) * ce_sum + kd_weight * div_sum
    if num_tokens_global == 0:
        return total * 0.0
    return total / num_tokens_global


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_token_count(local_count: int) -> int:
    """Token count summed over all workers (all-reduce SUM); `local_count` when not distributed.

    Every rank must call it (it is a collective) with its count summed over its accumulation
    micro-batches."""
    if not _dist_ready():
        return int(local_count)
    dist = torch.distributed
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    count = torch.tensor([int(local_count)], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return int(count.item())


def loss_denominator(local_count: int) -> float:
    """What to pass to `distillation_loss` under DDP: global token count / world size.

    Without torch.distributed (or with one process) it is the local count itself."""
    world = torch.distributed.get_world_size() if _dist_ready() else 1
    return global_token_count(local_count) / world
