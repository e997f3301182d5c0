"""One interface for every teacher engine: token sequences in, per-position top-k log-probs out.

For a sequence x of length L the teacher returns, for each row t = 0..L-2 (the prediction of
token t+1 from the prefix x[0..t]), the k most probable next tokens and their log-probs

    log p_T(v | x[0..t]) = z_v / T - logsumexp_u(z_u / T),      z = the model's logits,

normalized over the FULL vocabulary (not over the k kept), in descending order (rank 1..k).
That is exactly what a shard row stores (`topk_ids`, `topk_logprobs`).

Validation is shared here so every backend rejects the same bad requests with the same
`BackendError`, whose `field` names the offending request field with the REST API's names
(`input_ids`, `top_k`, `temperature`).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from todi.common.errors import TodiError
from todi.services.targets import TargetRequest, Targets, select, sequence_generator
from todi.storage.schema import TopK

# The temperatures any backend accepts: log_softmax(z / T) stays finite in float32 over
# this range (T = 1e-38 overflowed z / T to inf and returned NaN log-probs).
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3


@dataclass(frozen=True)
class TeacherInfo:
    """What a running backend serves; recorded in shard manifests and shown by the API."""

    model: str  # model id (folder name or given name)
    backend: str  # "hf" | "vllm" | "remote"
    vocab_size: int  # size of the model's output head (logits dimension)
    tokenizer_sha256: str  # todi.storage.fingerprints.tokenizer_fingerprint
    weights_sha256: str  # todi.storage.fingerprints.weights_fingerprint, or "remote:<url>:<model>"
    max_top_k: int
    max_model_len: int  # longest sequence (tokens) topk() accepts
    logprobs_mode: str  # how the log-probs were made, e.g. "raw_logprobs", "log_softmax_fp32"
    temperatures: tuple[float, ...] | None  # temperatures this backend serves; None = any
    # Whether `targets` sees the whole vocabulary (else the top-max_top_k candidates).
    full_distribution: bool = False

    @property
    def default_temperature(self) -> float:
        """What a request or job that names no temperature gets: the one temperature this
        backend serves, else 1.0."""
        temps = self.temperatures
        return float(temps[0]) if temps is not None and len(temps) == 1 else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["temperatures"] = None if self.temperatures is None else list(self.temperatures)
        return d


class BackendError(TodiError, ValueError):
    """A request this backend cannot serve (bad ids, top_k, temperature, length).

    `field` names the request field (`input_ids`, `top_k`, `temperature`, ...); the message
    starts with it, so it can be shown as is (the REST API answers 422 with it).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class TeacherBackend(ABC):
    """Base class: shared validation, a lock (engines are not re-entrant), context manager.

    Subclasses set `info` and `tokenizer` in `__init__` and implement `_topk` on validated
    input (lists of Python ints, 2 <= len <= max_model_len, ids in the vocabulary).
    """

    info: TeacherInfo
    tokenizer: Any

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    # -- public API ---------------------------------------------------------------------
    def topk(
        self, sequences: Sequence[Sequence[int]], top_k: int, temperature: float = 1.0
    ) -> list[TopK]:
        """Top-k log-probs for each sequence (see module docstring); order is preserved."""
        seqs, top_k, temperature = self.validate(sequences, top_k, temperature)
        if not seqs:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.info.backend} backend is closed")
            return self._topk(seqs, top_k, temperature)

    def targets(
        self,
        sequences: Sequence[Sequence[int]],
        request: TargetRequest,
        temperature: float,
        *,
        keys: Sequence[str],
        starts: Sequence[int],
    ) -> list[Targets]:
        """What `request` keeps (`todi.services.targets`) at rows starts[i] .. L-2 of each
        sequence; `keys` (sample ids) seed each sequence's draws. Engines that see the full
        vocabulary (`info.full_distribution`) draw from it; the others draw from their top-C
        candidates (C = max_top_k), whose mass `Targets.covered` reports, and cannot record
        the re-tempering statistics."""
        seqs, _, temperature = self.validate(sequences, max(request.top_k, 1), temperature)
        self.check_targets(request)
        if len(keys) != len(seqs) or len(starts) != len(seqs):
            raise ValueError("targets: one key and one start per sequence")
        if not seqs:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.info.backend} backend is closed")
            return self._targets(seqs, request, temperature, list(keys), list(starts))

    def check_targets(self, request: TargetRequest) -> None:
        """Raise BackendError unless this engine can produce what `request` keeps."""
        if not self.info.full_distribution and request.retemper:
            raise BackendError(
                "retemper",
                f"needs the teacher's full distribution at every position; the "
                f"{self.info.backend} engine returns its top-{self.info.max_top_k} only "
                "(use the hf engine, or capture at the training temperature)",
            )

    def _targets(
        self,
        sequences: list[list[int]],
        request: TargetRequest,
        temperature: float,
        keys: list[str],
        starts: list[int],
    ) -> list[Targets]:
        """Default: select from the engine's top-C candidates (C = max_top_k)."""
        import torch

        out = []
        for res, key, start in zip(
            self._topk(sequences, self.info.max_top_k, temperature), keys, starts, strict=True
        ):
            out.append(
                select(
                    torch.from_numpy(np.ascontiguousarray(res.logprobs[start:])),
                    request,
                    temperature=temperature,
                    generator=sequence_generator(request.sample_seed, key),
                    candidate_ids=torch.from_numpy(res.ids[start:].astype(np.int64)),
                )
            )
        return out

    def validate(
        self, sequences: Sequence[Sequence[int]], top_k: int, temperature: float = 1.0
    ) -> tuple[list[list[int]], int, float]:
        """Check a request against this backend; return it normalized or raise BackendError."""
        info = self.info
        if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
            raise BackendError("top_k", f"must be an integer, got {top_k!r}")
        top_k = int(top_k)
        if not 1 <= top_k <= info.max_top_k:
            raise BackendError(
                "top_k", f"{top_k} is outside [1, {info.max_top_k}] (max_top_k of this teacher)"
            )
        try:
            temperature = float(temperature)
        except (TypeError, ValueError):
            raise BackendError("temperature", f"must be a number, got {temperature!r}") from None
        if not (math.isfinite(temperature) and temperature > 0):
            raise BackendError("temperature", f"must be a finite number > 0, got {temperature}")
        if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise BackendError(
                "temperature",
                f"{temperature:g} is outside [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]",
            )
        if info.temperatures is not None and not any(
            math.isclose(temperature, t, rel_tol=1e-9, abs_tol=0.0) for t in info.temperatures
        ):
            raise BackendError("temperature", self._temperature_refusal(temperature))
        if isinstance(sequences, str | bytes) or not isinstance(sequences, Sequence | np.ndarray):
            raise BackendError("input_ids", "must be a list of token-id lists")
        out: list[list[int]] = []
        for i, seq in enumerate(sequences):
            arr = np.asarray(seq)
            if arr.ndim != 1:
                raise BackendError(f"input_ids[{i}]", "must be a flat list of token ids")
            if arr.size and arr.dtype.kind not in "iu":
                raise BackendError(f"input_ids[{i}]", f"token ids must be integers ({arr.dtype})")
            n = int(arr.size)
            if n < 2:
                raise BackendError(
                    f"input_ids[{i}]",
                    f"length {n} < 2: a sequence needs 2 tokens to have one predicted position",
                )
            if n > info.max_model_len:
                raise BackendError(
                    f"input_ids[{i}]", f"length {n} exceeds max_model_len={info.max_model_len}"
                )
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= info.vocab_size:
                bad = lo if lo < 0 else hi
                pos = int(np.flatnonzero(arr == bad)[0])
                raise BackendError(
                    f"input_ids[{i}][{pos}]",
                    f"token id {bad} is outside the vocabulary [0, {info.vocab_size})",
                )
            out.append(arr.astype(np.int64).tolist())
        return out, top_k, temperature

    def health(self) -> str | None:
        """None while the engine can serve; otherwise why it cannot (one line).

        Cheap and lock-free, so a liveness probe never waits behind a long engine call."""
        if self._closed:
            return f"{self.info.backend} backend is closed"
        return self._health()

    def close(self) -> None:
        """Release the engine (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()

    def __enter__(self) -> TeacherBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for subclasses -----------------------------------------------------------------
    @abstractmethod
    def _topk(self, sequences: list[list[int]], top_k: int, temperature: float) -> list[TopK]:
        """Compute on validated input."""

    def _health(self) -> str | None:
        """Engine-specific liveness (an in-process engine is alive while this process is)."""
        return None

    def _close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources; called once, under the lock."""

    def _temperature_refusal(self, temperature: float) -> str:
        served = ", ".join(f"{t:g}" for t in self.info.temperatures or ())
        return f"{temperature:g} is not served by this teacher (serves {served})"
