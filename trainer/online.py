"""Online teacher mode (for comparison only): the same top-k targets, computed each step.

The teacher runs in the training process through a teacher engine (the project's `hf`
backend, the same code that writes shards; whoever starts the run passes the factory, so
this package does not import the teacher service): for each sequence of the batch it returns
log_softmax(logits / T) over the full vocabulary, top-k, row t predicting token t + 1. Those
rows are put exactly where a shard's rows land in a `Batch` (the response positions, where
labels != -100), so an online batch and the offline batch of the same samples differ only by
what the shards store:

- `quantize=False` (default): float32 targets. They differ from the shard values by the shard
  codec's rounding (the 1/32-nat codecs: at most 1/64 nat per log-prob) and so does the
  loss, slightly.
- `quantize=True`: the targets go through the shard set's codec (storage's `encode_table`
  then `decode_table`), exactly as the precompute job stores them: the same batch then
  gives the same loss to float tolerance, which is what shows that the offline path is
  exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from todi.common.errors import TodiError
from todi.storage import IGNORE_INDEX, Batch, Sample, ShardSetMetadata, decode_table, encode_table
from todi.trainer.data import padding_row


class OnlineTeacherError(TodiError, ValueError):
    """A teacher that does not match the shard set; the message names both values."""


# (teacher_dir, max_top_k=, device=, dtype=) -> a running engine with `.info`, `.topk()` and
# `.close()`; `todi train` passes the `hf` backend's factory.
TeacherFactory = Callable[..., Any]


class OnlineTeacher:
    """Fills a Batch's top-k targets from a live HF teacher.

    `teacher`: an HF folder, started in float32 with `engine` (a TeacherFactory) and closed
    by `close`, or an already running engine (any kind; left open). `full_vocab`: the
    teacher's whole distribution (k = V ids per position, nothing in the tail) instead of the
    shard set's top-k: full-vocabulary distillation with the teacher in the loop."""

    def __init__(
        self,
        teacher,
        meta: ShardSetMetadata,
        *,
        quantize: bool = False,
        full_vocab: bool = False,
        device: str | None = None,
        vocab_limit: int | None = None,
        engine: TeacherFactory | None = None,
    ) -> None:
        if full_vocab and quantize:
            raise OnlineTeacherError("full_vocab targets are not shard rows: no quantize")
        # full_vocab: k = V (every id, no tail), the chunked loss then equals the dense form.
        top_k = meta.vocab_size if full_vocab else meta.top_k
        if isinstance(teacher, str | Path):
            if engine is None:
                raise OnlineTeacherError(
                    f"online teacher {teacher}: no engine to start it with (pass `engine`; "
                    "`todi train --online-teacher` passes the hf backend)"
                )
            self.backend = engine(str(teacher), max_top_k=top_k, device=device, dtype="float32")
            self._owned = True
        else:
            self.backend, self._owned = teacher, False
        teacher_dir = self.backend.info.model
        info = self.backend.info
        if info.tokenizer_sha256 != meta.tokenizer_sha256:
            raise OnlineTeacherError(
                f"online teacher {teacher_dir}: tokenizer sha256 {info.tokenizer_sha256[:16]}… "
                f"!= shard set's {meta.tokenizer_sha256[:16]}…"
            )
        if info.vocab_size != meta.vocab_size:
            raise OnlineTeacherError(
                f"online teacher {teacher_dir}: vocab_size {info.vocab_size} != shard set's "
                f"{meta.vocab_size}"
            )
        self.meta = meta
        self.top_k = top_k
        self.temperature = meta.temperature
        self.quantize = quantize
        self.vocab_limit = vocab_limit

    def targets(
        self, batch: Batch, *, quantize: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids long [B, T, k], topk_logprobs float32 [B, T, k]) for `batch`.

        `quantize` overrides the instance setting for this call."""
        quantize = self.quantize if quantize is None else quantize
        lengths = batch.attention_mask.sum(1).tolist()
        seqs = [batch.input_ids[i, : int(n)].tolist() for i, n in enumerate(lengths)]
        results = self.backend.topk(seqs, self.top_k, self.temperature)
        b, t = batch.input_ids.shape
        ids = torch.zeros((b, t, self.top_k), dtype=torch.long)
        lps = torch.zeros((b, t, self.top_k), dtype=torch.float32)
        counted = batch.labels != IGNORE_INDEX
        rows_of = [counted[i].nonzero().squeeze(1) for i in range(b)]
        blocks = [
            (res.ids[r.numpy()], res.logprobs[r.numpy()])
            for res, r in zip(results, rows_of, strict=True)
        ]
        if quantize:
            blocks = self._through_codec(batch, lengths, rows_of, blocks)
        for i, (r_ids, r_lps) in enumerate(blocks):
            if rows_of[i].numel() == 0:
                continue
            top = padding_row(r_ids, self.vocab_limit)
            if top is not None:
                raise OnlineTeacherError(
                    f"online teacher ranked padding row {top} (>= tokenizer size "
                    f"{self.vocab_limit}) into its top-{self.top_k}"
                )
            ids[i, rows_of[i]] = torch.from_numpy(np.asarray(r_ids, dtype=np.int64))
            lps[i, rows_of[i]] = torch.from_numpy(np.asarray(r_lps, dtype=np.float32))
        return ids, lps

    def _through_codec(self, batch: Batch, lengths, rows_of, blocks):
        """Encode and decode the rows with the shard set's codec (storage's own functions):
        exactly the values a shard written by the precompute job would hold."""
        samples, index = [], []
        for i, (r_ids, r_lps) in enumerate(blocks):
            rows = rows_of[i]
            if rows.numel() == 0:
                continue
            first, n = int(rows[0]), int(lengths[i])
            if int(rows[-1]) != n - 2 or rows.numel() != n - 1 - first:
                raise OnlineTeacherError("response positions are not one contiguous block")
            seq = batch.input_ids[i, :n].numpy().astype(np.int32)
            prompt_len = first + 1 if first > 0 else 0  # first stored = max(prompt_len - 1, 0)
            samples.append(Sample(f"online-{i}", seq, prompt_len, r_ids, r_lps))
            index.append(i)
        out = list(blocks)
        if samples:
            decoded = decode_table(encode_table(samples, self.meta), self.meta, "online")
            for i, s in zip(index, decoded, strict=True):
                out[i] = (s.topk_ids, s.topk_logprobs)
        return out

    def fill(self, batch: Batch, *, quantize: bool | None = None) -> Batch:
        """The same batch with the teacher's live top-k in place of the stored one.

        The live targets are top-k (or all V ids): any stored sampled-target weights are
        dropped with the stored ids (`target_weights=None`, the k ids + tail path)."""
        ids, lps = self.targets(batch, quantize=quantize)
        return Batch(
            batch.input_ids,
            batch.attention_mask,
            batch.labels,
            ids,
            lps,
            list(batch.sample_ids),
            target_weights=None,
        )

    def close(self) -> None:
        if self._owned:
            self.backend.close()
