"""Online teacher mode (for comparison only): the same top-k targets, computed each step.

The teacher runs in the training process through the project's `hf` backend (the same code
that writes shards): for each sequence of the batch it returns log_softmax(logits / T) over
the full vocabulary, top-k, row t predicting token t + 1. Those rows are put exactly where a
shard's rows land in a `Batch` (the response positions, where labels != -100), so an online
batch and the offline batch of the same samples differ only by what the shards store:

- `quantize=False` (default): float32 targets. They differ from the shard values by the shard
  codec's rounding (qdelta32: at most 1/64 nat per log-prob) and so does the loss, slightly.
- `quantize=True`: the targets go through the shard set's codec (encode, decode), exactly
  as the precompute job stores them: the same batch then gives the same loss to float
  tolerance, which is what shows that the offline path is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from storage import IGNORE_INDEX, Batch, ShardSetMetadata, get_codec


class OnlineTeacherError(ValueError):
    """A teacher that does not match the shard set; the message names both values."""


def _create_hf_backend(teacher_dir: str, **options):
    try:
        from services.backends import create_backend
    except ImportError:  # the backends package without its factory: use the class itself
        from services.backends.hf import HFBackend

        return HFBackend(teacher_dir, **options)
    return create_backend("hf", teacher_dir, **options)


class OnlineTeacher:
    """Fills a Batch's top-k targets from a live HF teacher."""

    def __init__(
        self,
        teacher_dir: str,
        meta: ShardSetMetadata,
        *,
        quantize: bool = False,
        device: str | None = None,
        vocab_limit: int | None = None,
    ) -> None:
        self.backend = _create_hf_backend(
            teacher_dir, max_top_k=meta.top_k, device=device, dtype="float32"
        )
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
        self.top_k = meta.top_k
        self.temperature = meta.temperature
        self.codec = get_codec(meta.codec)
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
        for i, res in enumerate(results):
            rows = counted[i].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            sel = rows.numpy()
            r_ids, r_lps = res.ids[sel], res.logprobs[sel]
            if quantize:
                a, c = self.codec.encode(r_ids, r_lps, self.meta.vocab_size)
                r_ids, r_lps = self.codec.decode(a, c, len(sel), self.top_k, self.meta.vocab_size)
            if self.vocab_limit is not None and r_ids.size and int(r_ids.max()) >= self.vocab_limit:
                raise OnlineTeacherError(
                    f"online teacher ranked padding row {int(r_ids.max())} (>= tokenizer size "
                    f"{self.vocab_limit}) into its top-{self.top_k}"
                )
            ids[i, rows] = torch.from_numpy(np.asarray(r_ids, dtype=np.int64))
            lps[i, rows] = torch.from_numpy(np.asarray(r_lps, dtype=np.float32))
        return ids, lps

    def fill(self, batch: Batch, *, quantize: bool | None = None) -> Batch:
        """The same batch with the teacher's live top-k in place of the stored one."""
        ids, lps = self.targets(batch, quantize=quantize)
        return Batch(
            batch.input_ids,
            batch.attention_mask,
            batch.labels,
            ids,
            lps,
            list(batch.sample_ids),
        )

    def close(self) -> None:
        self.backend.close()
