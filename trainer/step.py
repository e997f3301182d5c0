"""One optimizer step: the student objective module, the optimizer, the schedule, the step.

`StudentObjective` wraps the student so a data-parallel wrapper sees one forward: batch ->
(CE sum, divergence sum). The student's [positions, vocab] logits never exist at once: the
base model runs to the last hidden state (no lm_head), the response positions are gathered,
and `chunked_head_loss` computes logits chunk by chunk from the head weight. Training passes
the step's kd_weight, so the fused path runs: forward also makes each chunk's gradients (as
Liger's fused linear cross-entropy does) and backward only scales them.

`train_step` runs one optimizer step over a worker's micro-batches with the global-mean
denominator of `todi.trainer.objective` (docs/method.md, "The objective").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from todi.storage import IGNORE_INDEX, Batch
from todi.trainer.chunked import chunked_head_loss
from todi.trainer.config import TrainConfig
from todi.trainer.data import padding_counts
from todi.trainer.objective import distillation_loss, loss_denominator
from todi.trainer.strategy import clip_grad_norm, grad_sync, unwrap
from todi.trainer.student import body_and_head


class StudentObjective(nn.Module):
    """Wraps the student so DDP sees one forward: batch -> (CE sum, divergence sum).

    The forward runs the base model (final norm included, no lm_head) to the last hidden
    state, keeps the response positions and hands them with the head weight to
    `chunked_head_loss`. The head is sliced to `vocab_limit` rows (the vocabulary rule in
    `todi.trainer.data.check_pairing`): padding rows are outside the softmax.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        beta: float,
        temperature: float,
        chunk_size: int,
        vocab_limit: int | None = None,
        bf16: bool = False,
        kd_weight: float | None = None,
        tail: bool = True,
        sampled: str = "unbiased",
        spread: bool = False,
    ) -> None:
        super().__init__()
        self.spread = spread  # the teacher's rest spread over the unlisted ids (chunked_head_loss)
        self.tail = tail  # False: renormalized top-k, no tail bucket (chunked_head_loss)
        self.sampled = sampled  # the sampled-target estimator (chunked_head_loss)
        self.model = model
        self.kind, self.beta, self.temperature = kind, beta, temperature
        self.chunk_size = chunk_size
        self.vocab_limit = vocab_limit
        self.bf16 = bf16
        # With the objective's kd_weight known, chunked_head_loss makes the head gradients
        # chunk by chunk during forward (one head matmul less than recomputing in backward).
        self.kd_weight = kd_weight
        _, weight, _ = body_and_head(model)  # fail early on a model without a linear head
        # The padding rows of a padded head are outside the softmax, so they get no gradient;
        # AdamW's decoupled weight decay would still shrink them every step. Their values are
        # kept here and put back after each step (`restore_padding_rows`): exported unchanged.
        self._padding_rows = (
            weight.detach()[vocab_limit:].clone()
            if vocab_limit is not None and vocab_limit < weight.shape[0]
            else None
        )

    @torch.no_grad()
    def restore_padding_rows(self) -> None:
        """Undo what the optimizer did to the head's padding rows (weight decay).

        Under FSDP the head is a DTensor sharded on dim 0 (torch.chunk rows per worker): each
        worker restores the padding rows that fall in its own shard."""
        if self._padding_rows is None:
            return
        _, weight, _ = body_and_head(self.model)
        limit = int(self.vocab_limit or 0)
        if not hasattr(weight, "to_local"):
            weight[limit:].copy_(self._padding_rows)
            return
        local = weight.to_local()
        mesh = weight.device_mesh
        start = mesh.get_local_rank() * -(-weight.shape[0] // mesh.size())  # chunk rows
        lo, hi = max(limit, start), min(weight.shape[0], start + local.shape[0])
        if lo < hi:
            local[lo - start : hi - start].copy_(self._padding_rows[lo - limit : hi - limit])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_logprobs: torch.Tensor,
        target_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        body, weight, bias = body_and_head(self.model)
        dev = input_ids.device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = body(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        mask = labels != IGNORE_INDEX
        if self.vocab_limit is not None and self.vocab_limit < weight.shape[0]:
            weight = weight[: self.vocab_limit]
            bias = None if bias is None else bias[: self.vocab_limit]
        parts = chunked_head_loss(
            hidden[mask],
            weight,
            bias,
            labels[mask],
            topk_ids[mask],
            topk_logprobs[mask],
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            kd_weight=self.kd_weight,
            tail=self.tail,
            weights=None if target_weights is None else target_weights[mask],
            sampled=self.sampled,
            spread=self.spread,
        )
        return parts.ce_sum, parts.div_sum


def batch_sums(objective: nn.Module, batch: Batch, device: torch.device | str = "cpu"):
    """(CE sum, divergence sum) of one batch through `objective` (a StudentObjective or DDP)."""
    b = batch.to(device)
    return objective(
        b.input_ids, b.attention_mask, b.labels, b.topk_ids, b.topk_logprobs, b.target_weights
    )


# ------------------------------------------------------------------------------------------
# Optimizer, schedule, one step


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings, projections), none on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps ((s + 1) / (warmup + 1): never 0, so no step is
    wasted), then cosine from 1 to 0 over the remaining steps (paper default: no warm-up)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total)
    )


@dataclass
class StepStats:
    ce_sum: float
    div_sum: float
    tokens: int  # this worker's counted positions
    real_tokens: int
    padded_slots: int
    grad_norm: float
    lr: float


def train_step(
    objective: nn.Module,
    micro_batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    kd_weight: float,
    grad_clip: float,
    device: torch.device | str = "cpu",
) -> StepStats:
    """One optimizer step over this worker's micro-batches (>= 1; all workers call it).

    Every micro-batch's loss uses the same denominator, the step's global token count over
    the world size (`loss_denominator`), so accumulation and DDP averaging together give the
    gradient of the mean over all response tokens of the global batch. Under DDP only the
    last micro-batch synchronizes gradients (`todi.trainer.strategy.grad_sync`); FSDP
    reduce-scatters (averages) gradients like DDP's all-reduce, so the same denominator holds."""
    local = sum(b.num_tokens for b in micro_batches)
    denom = loss_denominator(local)
    ce_total = div_total = 0.0
    real = padded = 0
    for i, batch in enumerate(micro_batches):
        with grad_sync(objective, last=i == len(micro_batches) - 1):
            ce_sum, div_sum = batch_sums(objective, batch, device)
            loss = distillation_loss(ce_sum, div_sum, denom, kd_weight)
            loss.backward()
        ce_total += float(ce_sum.detach())
        div_total += float(div_sum.detach())
        r, p = padding_counts(batch)
        real += r
        padded += p
    params = [p for p in objective.parameters() if p.grad is not None]
    grad_norm = clip_grad_norm(params, grad_clip if grad_clip > 0 else float("inf"))
    lr = float(scheduler.get_last_lr()[0])
    optimizer.step()
    inner = unwrap(objective)
    if isinstance(inner, StudentObjective):
        inner.restore_padding_rows()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(ce_total, div_total, local, real, padded, grad_norm, lr)
