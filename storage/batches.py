"""Padded torch batches from samples: what a training step consumes.

Positions are aligned with the token sequence: row t of the batch's top-k predicts token
t + 1, exactly like the student's logits at t. Positions that carry no teacher target
(prompt, the last token, padding) have label -100 and zero top-k rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from storage.schema import Sample

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, T]
    attention_mask: torch.Tensor  # long [B, T]
    labels: torch.Tensor  # long [B, T]: next token at response positions, else -100
    topk_ids: torch.Tensor  # long [B, T, k]
    topk_logprobs: torch.Tensor  # float32 [B, T, k]
    sample_ids: list[str]

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    @property
    def num_tokens(self) -> int:
        """Response tokens that count in the loss."""
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.topk_ids.to(device),
            self.topk_logprobs.to(device),
            self.sample_ids,
        )


def collate(samples: list[Sample], *, pad_id: int = 0, pad_to_multiple: int = 1) -> Batch:
    """Right-pad a list of samples into one Batch."""
    if not samples:
        raise ValueError("collate: no samples")
    k = samples[0].topk_ids.shape[1]
    longest = max(len(s.input_ids) for s in samples)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    b = len(samples)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    attention = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
    topk_ids = np.zeros((b, width, k), dtype=np.int64)
    topk_lps = np.zeros((b, width, k), dtype=np.float32)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = s.input_ids
        attention[i, :n] = 1
        start = s.first_position
        end = start + s.num_positions  # == n - 1
        labels[i, start:end] = s.input_ids[start + 1 : end + 1]
        topk_ids[i, start:end] = s.topk_ids
        topk_lps[i, start:end] = s.topk_logprobs
    return Batch(
        torch.from_numpy(input_ids),
        torch.from_numpy(attention),
        torch.from_numpy(labels),
        torch.from_numpy(topk_ids),
        torch.from_numpy(topk_lps),
        [s.sample_id for s in samples],
    )


def iter_batches(
    samples: Iterable[Sample],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    bucket_buffer: int = 0,
    drop_last: bool = False,
    pad_id: int = 0,
) -> Iterator[Batch]:
    """Stream padded batches with bounded memory.

    - `shuffle_buffer` > 0: a reservoir of that many samples, shuffled with `seed`.
    - `bucket_buffer` > 0: gather that many samples, sort by length, cut into batches, and
      emit the batches in random order: padding waste drops without breaking randomness.
    - `max_tokens`: cap on batch_size * padded length (whichever limit hits first).
    """
    rng = random.Random(seed)
    stream: Iterable[Sample] = samples
    if shuffle_buffer > 0:
        stream = _shuffled(samples, shuffle_buffer, rng)

    def cut(group: list[Sample]) -> Iterator[list[Sample]]:
        batch: list[Sample] = []
        longest = 0
        for s in group:
            n = len(s.input_ids)
            over_budget = (
                max_tokens is not None and batch and max(longest, n) * (len(batch) + 1) > max_tokens
            )
            if len(batch) == batch_size or over_budget:
                yield batch
                batch, longest = [], 0
            batch.append(s)
            longest = max(longest, n)
        if batch and not (drop_last and len(batch) < batch_size):
            yield batch

    if bucket_buffer <= 0:
        for group in cut(stream):  # streams: holds at most one batch
            yield collate(group, pad_id=pad_id)
        return
    pending: list[Sample] = []
    for s in stream:
        pending.append(s)
        if len(pending) >= bucket_buffer:
            yield from _bucketed(pending, cut, rng, pad_id)
            pending = []
    if pending:
        yield from _bucketed(pending, cut, rng, pad_id)


def _bucketed(pending: list[Sample], cut, rng: random.Random, pad_id: int) -> Iterator[Batch]:
    pending.sort(key=lambda s: len(s.input_ids))
    groups = list(cut(pending))
    rng.shuffle(groups)
    for group in groups:
        yield collate(group, pad_id=pad_id)


def _shuffled(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    buffer: list[Sample] = []
    for s in samples:
        if len(buffer) < size:
            buffer.append(s)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = s
    rng.shuffle(buffer)
    yield from buffer


def padding_waste(batch: Batch) -> float:
    """Share of the batch's token slots that are padding."""
    return 1.0 - float(batch.attention_mask.float().mean())
