"""Encodings of the per-sample top-k block ([P, k] ids and log-probs) into two byte strings.

The codec name is recorded in the shard metadata (`codec`), so the format can evolve without
breaking old sets: a reader looks the name up here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class TopKCodec(ABC):
    name: str

    @abstractmethod
    def encode(self, ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> tuple[bytes, bytes]:
        """[P, k] ids (rank order) and log-probs -> (id bytes, log-prob bytes)."""

    @abstractmethod
    def decode(
        self, id_blob: bytes, lp_blob: bytes, positions: int, k: int, vocab_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> int32 [positions, k] ids and float32 [positions, k] log-probs."""


def _rank_order(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by descending log-prob (a stable no-op for engine output)."""
    order = np.argsort(-logprobs, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def _planes(a: np.ndarray, nbytes: int) -> bytes:
    """Little-endian bytes of `a`, split into byte planes (all lowest bytes first, ...).

    Neighbouring values share their high bytes; grouping them lets zstd see runs.
    """
    raw = a.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :nbytes]
    return raw.T.tobytes()


def _unplanes(blob: bytes, count: int, nbytes: int) -> np.ndarray:
    raw = np.frombuffer(blob, dtype=np.uint8)
    if raw.size != count * nbytes:
        raise ValueError(f"expected {count * nbytes} bytes, got {raw.size}")
    out = np.zeros((count, 4), dtype=np.uint8)
    out[:, :nbytes] = raw.reshape(nbytes, count).T
    return out.view("<u4").reshape(count).astype(np.int64)


def _id_bytes(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 3 if vocab_size <= 1 << 24 else 4


class QuantDeltaPlanes(TopKCodec):
    """Ids as byte planes in rank order; log-probs quantized to 1/`scale` nat, rank-delta coded.

    q_j = round(-logprob_j * scale) is non-decreasing along the ranks, so the deltas
    q_j - q_{j-1} >= 0 are small and stored in one byte each (255 escapes to a 2-byte
    value in a side stream). Max error 1/(2*scale) nat, mean about 1/(4*scale).
    """

    def __init__(self, scale: int) -> None:
        self.scale = scale
        self.name = f"qdelta{scale}-planes-v1"

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> tuple[bytes, bytes]:
        ids, logprobs = _rank_order(ids, logprobs)
        id_blob = _planes(ids.reshape(-1), _id_bytes(vocab_size))
        q = np.round(-np.minimum(logprobs.astype(np.float64), 0.0) * self.scale).astype(np.int64)
        deltas = np.diff(q, axis=1, prepend=0).reshape(-1)
        small = np.minimum(deltas, 255).astype(np.uint8)
        big = deltas[deltas >= 255]
        lp_blob = small.tobytes() + _planes(big, 3)
        return id_blob, lp_blob

    def decode(
        self, id_blob: bytes, lp_blob: bytes, positions: int, k: int, vocab_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        count = positions * k
        ids = _unplanes(id_blob, count, _id_bytes(vocab_size)).astype(np.int32)
        small = np.frombuffer(lp_blob[:count], dtype=np.uint8).astype(np.int64)
        if small.size != count:
            raise ValueError(f"expected {count} log-prob bytes, got {small.size}")
        escaped = small == 255
        rest = lp_blob[count:]
        deltas = small.copy()
        deltas[escaped] = _unplanes(rest, int(escaped.sum()), 3)
        q = np.cumsum(deltas.reshape(positions, k), axis=1)
        return ids.reshape(positions, k), (-q / self.scale).astype(np.float32)


_CODECS: dict[str, TopKCodec] = {c.name: c for c in (QuantDeltaPlanes(32),)}
DEFAULT_CODEC = "qdelta32-planes-v1"


def get_codec(name: str) -> TopKCodec:
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(
            f"unknown shard codec {name!r} (known: {', '.join(_CODECS)}); "
            "the set was written by a newer todi-distill"
        ) from None
