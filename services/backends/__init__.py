"""Teacher engines behind one interface (`TeacherBackend.topk`); `create_backend` picks one.

- `hf`: transformers forward in this process (any temperature).
- `vllm`: the vLLM engine (`vllm.LLM`; needs a `__main__` guard in the calling script);
  one temperature per engine, served exactly through a tempered folder.
- `remote`: a running `vllm serve` (OpenAI-compatible), temperature declared by the user.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from todi.services.backends.base import BackendError, TeacherBackend, TeacherInfo, TopK

BACKENDS = ("hf", "vllm", "remote")

__all__ = ["BACKENDS", "BackendError", "TeacherBackend", "TeacherInfo", "TopK", "create_backend"]


def _backend_class(kind: str) -> type[TeacherBackend]:
    if kind == "hf":
        from todi.services.backends.hf import HFBackend

        return HFBackend
    if kind == "vllm":
        from todi.services.backends.vllm import VLLMBackend

        return VLLMBackend
    if kind == "remote":
        from todi.services.backends.remote import RemoteBackend

        return RemoteBackend
    raise BackendError("backend", f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")


def create_backend(kind: str, model: str | Path, **options: Any) -> TeacherBackend:
    """Start a teacher backend.

    `model` is an HF folder or an embedded model name (for `remote`, the local copy that
    provides the tokenizer and vocabulary). Options are the backend's keyword arguments,
    e.g. hf: dtype, device, max_top_k, max_model_len, token_budget; vllm: temperature,
    dtype, max_top_k, max_model_len, max_num_batched_tokens, kv_cache_space_gib, engine_args;
    remote: url, served_model, temperature, max_top_k, max_model_len, concurrency, api_key.
    Options set to None are dropped (they mean "the backend's default").
    """
    cls = _backend_class(kind)
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(params) - {"self", "model"})
    if unknown:
        known = ", ".join(p for p in params if p not in ("self", "model"))
        raise BackendError("options", f"unknown option(s) {unknown} for {kind}; known: {known}")
    options = {k: v for k, v in options.items() if v is not None}
    missing = [
        name
        for name, p in params.items()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and name not in options
    ]
    if missing:
        raise BackendError("options", f"the {kind} backend needs option(s) {missing}")
    return cls(model, **options)
