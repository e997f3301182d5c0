"""What a position stores, chosen from the teacher's full-vocabulary log-probs.

The engine gives, at every stored position, log p over the whole vocabulary at the capture
temperature (or over a candidate set: the engine's top-C, whose covered mass is recorded).
This module picks what the shard keeps (`TargetRequest`):

- `topk`:    the k most likely ids and their log-probs (the tail bucket is implicit);
- `sampled`: N draws with replacement from p (RS-KD, Anshumann et al. 2025), stored as the
             unique ids, their counts and their log-probs; with k > 0 the exact top-k is kept
             as well and the draws come from the mass outside it (a hybrid: the head exact,
             the rest sampled);
- either, with `retemper`: for each training temperature T_g the log-partition of the ids NOT
             stored, f_g = log sum_{v not stored} exp(s_g l_v) with s_g = T_capture / T_g, which
             re-tempers the stored entries exactly (docs/method.md).

Draws are reproducible: position rows of a sequence draw from one generator seeded with
(sample_seed, sample_id), so the same job gives the same draws whatever the batching (on one
CPU: the probabilities themselves can differ by a few ULP between batch shapes or CPUs, which
can move a draw that lands within that distance of a boundary of the cumulative sum).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from todi.storage.draws import MAX_DRAWS, Draws, draws_from_samples

TargetKind = Literal["topk", "sampled"]


class TargetRequest(BaseModel):
    """What to keep per position (the part of a job that defines the shard content)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: TargetKind = "topk"
    top_k: int = Field(ge=0)
    draws: int = Field(0, ge=0, le=MAX_DRAWS)
    sample_seed: int = Field(0, ge=0)
    retemper: tuple[float, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> TargetRequest:
        if self.targets == "topk" and (self.top_k < 1 or self.draws):
            raise ValueError("targets 'topk' needs top_k >= 1 and draws = 0")
        if self.targets == "sampled" and self.draws < 1:
            raise ValueError("targets 'sampled' needs draws >= 1")
        return self

    @property
    def needs_full_distribution(self) -> bool:
        """More than the top-k: draws, or the log-partition outside the stored ids."""
        return self.targets == "sampled" or bool(self.retemper)


@dataclass
class Targets:
    """What `select` keeps for P positions of one sequence."""

    topk_ids: np.ndarray  # int32 [P, k]
    topk_logprobs: np.ndarray  # float32 [P, k]
    draws: Draws | None  # sampled: the unique drawn ids, counts, log-probs
    tail_logz: np.ndarray | None  # float32 [P, G] with `retemper`
    covered: np.ndarray  # float64 [P]: teacher mass of the candidate set (1 = full vocabulary)


def sequence_generator(sample_seed: int, sample_id: str) -> torch.Generator:
    """The draws' generator of one sequence: a pure function of (seed, sample id)."""
    digest = hashlib.sha256(f"{sample_seed}:{sample_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def select(
    logprobs: torch.Tensor,
    request: TargetRequest,
    *,
    temperature: float,
    generator: torch.Generator | None = None,
    candidate_ids: torch.Tensor | None = None,
) -> Targets:
    """Targets of P positions from their log-probs.

    logprobs: float32 [P, V] over the full vocabulary (`candidate_ids` None), or [P, C] over
    candidate ids `candidate_ids` long [P, C] (an engine's top-C; the draws then come from the
    candidates renormalized and `covered` records their mass). `temperature` is the capture
    temperature (the log-probs' own), used for the re-tempering grid.
    """
    lp = logprobs.float()
    p_rows = lp.shape[0]
    # A full-vocabulary row holds all the mass: no [P, V] exp pass on the hot path for it.
    covered = (
        np.ones(p_rows)
        if candidate_ids is None
        else lp.double().exp().sum(-1).clamp_max(1.0).numpy()
    )
    k = request.top_k
    if k:
        top_lp, top_col = torch.topk(lp, k, dim=-1)
    else:
        top_lp = torch.zeros((p_rows, 0))
        top_col = torch.zeros((p_rows, 0), dtype=torch.long)
    listed = [top_col]
    draws = None
    if request.targets == "sampled":
        weights = lp.exp()
        if k:
            weights.scatter_(1, top_col, 0.0)  # the hybrid: draws from the mass outside the top-k
        empty = weights.sum(-1) <= 0
        if bool(empty.any()):  # nothing outside the top-k (k >= support): draw the top-1
            weights[empty, top_col[empty, 0] if k else 0] = 1.0
        cols = torch.multinomial(weights, request.draws, replacement=True, generator=generator)
        drawn_lp = lp.gather(1, cols)
        ids = cols if candidate_ids is None else candidate_ids.gather(1, cols)
        draws = draws_from_samples(ids.numpy().astype(np.int64), drawn_lp.numpy())
        listed.append(cols)
    tail = None
    if request.retemper:
        masked = lp.clone()
        for cols in listed:
            masked.scatter_(1, cols, -torch.inf)
        tail = torch.stack(
            [torch.logsumexp(masked * (temperature / t), dim=-1) for t in request.retemper], 1
        ).numpy()
    top_ids = top_col if candidate_ids is None else candidate_ids.gather(1, top_col)
    return Targets(
        topk_ids=top_ids.numpy().astype(np.int32),
        topk_logprobs=top_lp.numpy().astype(np.float32),
        draws=draws,
        tail_logz=None if tail is None else tail.astype(np.float32),
        covered=covered,
    )


def concat_targets(parts: list[Targets], positions: int, request: TargetRequest) -> Targets:
    """The targets of consecutive row blocks of one sequence as one (P = `positions`)."""
    if not parts:
        k = request.top_k
        empty = Draws(np.zeros(1, np.int64), *(np.zeros(0, t) for t in (np.int32, np.int32)),
                      np.zeros(0, np.float32))  # fmt: skip
        return Targets(
            np.zeros((positions, k), np.int32),
            np.zeros((positions, k), np.float32),
            empty if request.targets == "sampled" else None,
            np.zeros((positions, len(request.retemper)), np.float32) if request.retemper else None,
            np.ones(positions),
        )
    if len(parts) == 1:
        return parts[0]
    draws = None
    if parts[0].draws is not None:
        ds = [t.draws for t in parts]
        starts = np.cumsum([0] + [d.ids.size for d in ds[:-1]])
        draws = Draws(
            offsets=np.concatenate(
                [ds[0].offsets[:1]] + [d.offsets[1:] + s for d, s in zip(ds, starts, strict=True)]
            ),
            ids=np.concatenate([d.ids for d in ds]),
            counts=np.concatenate([d.counts for d in ds]),
            logprobs=np.concatenate([d.logprobs for d in ds]),
        )
    tails = [t.tail_logz for t in parts]
    return Targets(
        topk_ids=np.concatenate([t.topk_ids for t in parts]),
        topk_logprobs=np.concatenate([t.topk_logprobs for t in parts]),
        draws=draws,
        tail_logz=None if tails[0] is None else np.concatenate(tails),
        covered=np.concatenate([t.covered for t in parts]),
    )
