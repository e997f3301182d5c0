"""The training objective: the global-mean loss over a step's counted tokens, under DDP too.

`todi.trainer.chunked.chunked_head_loss` gives each micro-batch's SUMS (CE and divergence);
`distillation_loss` weighs them and divides by one common denominator, `loss_denominator`.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
