"""Padded torch batches from samples: what a training step consumes.

Positions are aligned with the token sequence: row t of the batch's top-k predicts token
t + 1, exactly like the student's logits at t. Positions that carry no teacher target
(prompt, the last token, padding) have label -100 and zero top-k rows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from todi.storage.retemper import sample_targets
from todi.storage.schema import Sample, ShardSetMetadata

IGNORE_INDEX = -100


class _HasId(Protocol):
    @property
    def sample_id(self) -> str: ...


_Item = TypeVar("_Item", bound=_HasId)


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, T]
    attention_mask: torch.Tensor  # long [B, T]
    labels: torch.Tensor  # long [B, T]: next token at response positions, else -100
    topk_ids: torch.Tensor  # long [B, T, k]
    topk_logprobs: torch.Tensor  # float32 [B, T, k]
    sample_ids: list[str]
    # Sampled targets: estimator weight of each entry [B, T, k] (0 = padding); None = top-k
    # + tail. See `todi.storage.retemper`.
    target_weights: torch.Tensor | None = None

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
            None if self.target_weights is None else self.target_weights.to(device),
        )


def collate(
    samples: list[Sample],
    *,
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    meta: ShardSetMetadata | None = None,
    temperature: float | None = None,
) -> Batch:
    """Right-pad a list of samples into one Batch.

    `meta` (the set's metadata) is needed for sampled sets and for a `temperature` other than
    the capture's: the targets then come from `todi.storage.retemper.sample_targets`."""
    if not samples:
        raise ValueError("collate: no samples")
    native = temperature is None or (
        meta is not None and math.isclose(temperature, meta.temperature, rel_tol=1e-9)
    )
    plain = meta is None or (meta.targets == "topk" and native)
    if meta is None and any(s.draws is not None for s in samples):
        raise ValueError("collate: samples with draws need the set's metadata (meta=)")
    if plain:
        targets = [(s.topk_ids, s.topk_logprobs, None) for s in samples]
    else:
        targets = [sample_targets(s, meta, temperature) for s in samples]  # type: ignore[arg-type]
    k = max(t[0].shape[1] for t in targets)
    weighted = targets[0][2] is not None
    longest = max(len(s.input_ids) for s in samples)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    b = len(samples)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    attention = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
    topk_ids = np.zeros((b, width, k), dtype=np.int64)
    topk_lps = np.zeros((b, width, k), dtype=np.float32)
    weights = np.zeros((b, width, k), dtype=np.float32) if weighted else None
    for i, (s, (ids, lps, w)) in enumerate(zip(samples, targets, strict=True)):
        n = len(s.input_ids)
        input_ids[i, :n] = s.input_ids
        attention[i, :n] = 1
        start = s.first_position
        end = start + s.num_positions  # == n - 1
        labels[i, start:end] = s.input_ids[start + 1 : end + 1]
        topk_ids[i, start:end, : ids.shape[1]] = ids
        topk_lps[i, start:end, : ids.shape[1]] = lps
        if weights is not None:
            weights[i, start:end, : ids.shape[1]] = w
    return Batch(
        torch.from_numpy(input_ids),
        torch.from_numpy(attention),
        torch.from_numpy(labels),
        torch.from_numpy(topk_ids),
        torch.from_numpy(topk_lps),
        [s.sample_id for s in samples],
        None if weights is None else torch.from_numpy(weights),
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
    meta: ShardSetMetadata | None = None,
    temperature: float | None = None,
) -> Iterator[Batch]:
    """Stream padded batches with bounded memory; the plan is `plan_batches`'s."""
    groups = plan_batches(
        samples,
        length=lambda s: len(s.input_ids),
        batch_size=batch_size,
        max_tokens=max_tokens,
        shuffle_buffer=shuffle_buffer,
        bucket_buffer=bucket_buffer,
        rng=random.Random(seed),
        drop_last=drop_last,
    )
    for group in groups:
        yield collate(group, pad_id=pad_id, meta=meta, temperature=temperature)


def plan_batches(
    items: Iterable[_Item],
    *,
    length: Callable[[_Item], int],
    batch_size: int,
    max_tokens: int | None,
    shuffle_buffer: int,
    bucket_buffer: int,
    rng: random.Random,
    drop_last: bool = False,
) -> Iterator[list[_Item]]:
    """Group a stream of sequences (decoded samples, or the trainer's raw shard rows) into
    batches, with bounded memory. A pure function of the items' order and `rng`'s state.

    - `shuffle_buffer` > 0: a reservoir of that many items, shuffled with `rng`.
    - `bucket_buffer` > 0: gather that many items, sort by (length, sample_id), cut into
      batches and emit them in random order: padding drops without breaking randomness.
    - at most `batch_size` items and, with `max_tokens`, at most that many padded tokens
      (rows * longest) a batch; a single longer item still forms its own batch.
    - `drop_last`: leave out a short last batch (of each bucket, with bucketing).
    """
    stream = shuffle_buffered(items, shuffle_buffer, rng)

    def cut(group: Iterable[_Item]) -> Iterator[list[_Item]]:
        batch: list[_Item] = []
        longest = 0
        for item in group:
            n = length(item)
            over = (
                max_tokens is not None and batch and max(longest, n) * (len(batch) + 1) > max_tokens
            )
            if len(batch) == batch_size or over:
                yield batch
                batch, longest = [], 0
            batch.append(item)
            longest = max(longest, n)
        if batch and not (drop_last and len(batch) < batch_size):
            yield batch

    def bucketed(pending: list[_Item]) -> list[list[_Item]]:
        # Ties by id: the order must not depend on how the items arrived.
        pending.sort(key=lambda item: (length(item), item.sample_id))
        groups = list(cut(pending))
        rng.shuffle(groups)
        return groups

    if bucket_buffer <= 0:
        yield from cut(stream)  # streams: holds at most one batch
        return
    pending: list[_Item] = []
    for item in stream:
        pending.append(item)
        if len(pending) >= bucket_buffer:
            yield from bucketed(pending)
            pending = []
    if pending:
        yield from bucketed(pending)


def shuffle_buffered(items: Iterable[_Item], size: int, rng: random.Random) -> Iterator[_Item]:
    """A reservoir shuffle: each incoming item replaces a random one of `size` held items,
    which is emitted; the rest come out shuffled at the end. `size` <= 0: unchanged order."""
    if size <= 0:
        yield from items
        return
    buffer: list[_Item] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def padding_waste(batch: Batch) -> float:
    """Share of the batch's token slots that are padding."""
    return 1.0 - float(batch.attention_mask.float().mean())
