"""transformers teacher: forward pass, float32 log-softmax of logits / T, top-k.

Sequences are sorted by length and packed into batches of at most `token_budget` padded
tokens ([B, L_max] with B * L_max <= budget; a longer sequence goes alone). Padding is on
the right with an attention mask, so real positions see exactly their own causal prefix.
The full-vocabulary log-softmax is done in float32 in row chunks, so memory stays about
token_budget x vocab x 4 bytes for the logits plus one chunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from todi.services.backends.base import BackendError, TeacherBackend, TeacherInfo, TopK
from todi.services.models import resolve_model
from todi.services.targets import TargetRequest, Targets, concat_targets, select, sequence_generator
from todi.storage.fingerprints import tokenizer_fingerprint, weights_fingerprint

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def _torch_dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise BackendError("dtype", f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return getattr(torch, _DTYPES[name])


def pack_by_budget(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into batches with len(batch) * max_len(batch) <= token_budget.

    Longest first, so each batch pads to its first element and neighbours have similar
    lengths (little padding). A sequence longer than the budget forms its own batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1) * width > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class HFBackend(TeacherBackend):
    """A transformers AutoModelForCausalLM teacher; serves any temperature."""

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | None = None,
        device: str | None = None,
        max_top_k: int = 64,
        max_model_len: int | None = None,
        token_budget: int = 2048,
        logsoftmax_rows: int = 1024,
        name: str | None = None,
    ) -> None:
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:  # exact on CPU; bf16 where it is the native fast path
            dtype = "float32" if device == "cpu" else "bfloat16"
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype)
        if token_budget < 1:
            raise BackendError("token_budget", f"must be >= 1, got {token_budget}")
        self.token_budget = int(token_budget)
        self.logsoftmax_rows = max(1, int(logsoftmax_rows))

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        self.model.to(self.device).eval()
        head = self.model.get_output_embeddings()
        vocab = int(head.weight.shape[0]) if head is not None else int(self.model.vocab_size)
        config = self.model.config.get_text_config()
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
        if max_model_len is None:
            max_model_len = limit
        if not 2 <= max_model_len <= limit:
            raise BackendError("max_model_len", f"{max_model_len} is outside [2, {limit}]")
        if not 1 <= max_top_k <= vocab:
            raise BackendError("max_top_k", f"{max_top_k} is outside [1, {vocab}]")
        self.info = TeacherInfo(
            model=name or path.name,
            backend="hf",
            vocab_size=vocab,
            tokenizer_sha256=tokenizer_fingerprint(self.tokenizer),
            weights_sha256=weights_fingerprint(path),
            max_top_k=int(max_top_k),
            max_model_len=int(max_model_len),
            logprobs_mode="log_softmax_fp32",
            temperatures=None,
            full_distribution=True,
        )
        self.model_dir = path

    def _topk(self, sequences: list[list[int]], top_k: int, temperature: float) -> list[TopK]:
        import torch

        results: list[TopK | None] = [None] * len(sequences)
        with torch.inference_mode():
            for i, logits in self._forward(sequences):
                results[i] = self._rows_topk(logits, top_k, temperature)
        return results  # type: ignore[return-value]

    def _forward(self, sequences: list[list[int]]):
        """(index, logits [L-1, V]) of each sequence, in packed batches (no grad)."""
        import torch

        lengths = [len(s) for s in sequences]
        for batch in pack_by_budget(lengths, self.token_budget):
            width = lengths[batch[0]]
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.tensor(sequences[i], dtype=torch.long)
                mask[row, : lengths[i]] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).logits
            for row, i in enumerate(batch):
                yield i, logits[row, : lengths[i] - 1]
            del logits

    def _targets(
        self,
        sequences: list[list[int]],
        request: TargetRequest,
        temperature: float,
        keys: list[str],
        starts: list[int],
    ) -> list[Targets]:
        """`select` on the full-vocabulary log-softmax, `logsoftmax_rows` rows at a time; one
        generator per sequence, consumed row block by row block (same blocks every run)."""
        import torch

        results: list[Targets | None] = [None] * len(sequences)
        with torch.inference_mode():
            for i, logits in self._forward(sequences):
                gen = sequence_generator(request.sample_seed, keys[i])
                parts = []
                rows = logits[starts[i] :]
                for lo in range(0, rows.shape[0], self.logsoftmax_rows):
                    z = rows[lo : lo + self.logsoftmax_rows].float()
                    if temperature != 1.0:
                        z = z / temperature
                    lp = torch.log_softmax(z, dim=-1).cpu()
                    parts.append(select(lp, request, temperature=temperature, generator=gen))
                results[i] = concat_targets(parts, rows.shape[0], request)
        return results  # type: ignore[return-value]

    def _rows_topk(self, logits, top_k: int, temperature: float) -> TopK:
        """log_softmax(logits / T) in float32 over the full vocabulary, then top-k."""
        import torch

        n = logits.shape[0]
        ids = np.empty((n, top_k), dtype=np.int32)
        vals = np.empty((n, top_k), dtype=np.float32)
        for start in range(0, n, self.logsoftmax_rows):
            z = logits[start : start + self.logsoftmax_rows].float()
            if temperature != 1.0:
                z = z / temperature
            lp = torch.log_softmax(z, dim=-1)
            v, ix = torch.topk(lp, top_k, dim=-1)
            ids[start : start + len(ix)] = ix.cpu().numpy()
            vals[start : start + len(v)] = v.cpu().numpy()
        return TopK(ids=ids, logprobs=vals)

    def _close(self) -> None:
        del self.model
