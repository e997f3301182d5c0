"""Dynamic batching: one engine thread gathers concurrent requests into one `backend.topk` call.

Engines are not re-entrant and gain throughput from bigger batches, so every caller (REST
requests, precompute jobs) puts an item on one queue and a single worker thread owns the
engine. The worker takes the oldest item, then keeps taking queued items for at most
`window_s` (only waited for when the queue runs dry) while the gathered tokens stay within
`max_batch_tokens`, and runs each temperature group as ONE engine call with
k = max(k_i); every item gets its rows sliced to its own k (the top-k of a larger k,
truncated, is the top-k: both are in descending log-prob order).

While the engine runs, new requests pile up in the queue and form the next batch: under
load the batch size grows by itself, with no wait; at idle a request waits <= window_s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from todi.common.errors import TodiError
from todi.services.backends import TeacherBackend, TopK


class ShuttingDown(TodiError, RuntimeError):
    """The batcher is stopping: the request was not (and will not be) run."""


@dataclass
class _Item:
    sequences: list[list[int]]
    top_k: int
    temperature: float
    source: str
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass(frozen=True)
class BatchStats:
    """One engine call, reported to `on_batch` (for metrics)."""

    items: int  # requests / job chunks served by this call
    sequences: int
    tokens: int
    seconds: float  # engine time of the call
    queue_wait_seconds: float  # longest wait of an item in the call before the engine ran
    tokens_by_source: dict[str, int]  # "request" / "job" -> tokens
    sequences_by_source: dict[str, int]
    ok: bool


class DynamicBatcher:
    """Owns the engine thread. `submit` is thread-safe and returns a Future[list[TopK]]."""

    def __init__(
        self,
        backend: TeacherBackend,
        *,
        window_s: float = 0.005,
        max_batch_tokens: int = 16_384,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.backend = backend
        self.window_s = max(0.0, float(window_s))
        self.max_batch_tokens = int(max_batch_tokens)
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.engine_calls = 0
        self.items_served = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="todi-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the running call, fail what is still queued, and join the thread."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for item in dropped:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(ShuttingDown("the service is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- submitting -------------------------------------------------------------------------
    def submit(
        self,
        sequences: list[list[int]],
        top_k: int,
        temperature: float = 1.0,
        *,
        source: str = "request",
    ) -> Future:
        """Queue validated sequences; the Future resolves to one TopK per sequence."""
        item = _Item(list(sequences), int(top_k), float(temperature), source)
        if not item.sequences:
            item.future.set_result([])
            return item.future
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the service is shutting down")
            self._pending.append(item)
            self._cond.notify()
        return item.future

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def queued_tokens(self) -> int:
        with self._cond:
            return sum(i.tokens for i in self._pending)

    # -- the engine thread -------------------------------------------------------------------
    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            batch = [self._pending.popleft()]
            tokens = batch[0].tokens
            deadline = time.monotonic() + self.window_s
            while tokens < self.max_batch_tokens:
                if not self._pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                    continue
                nxt = self._pending[0]
                if tokens + nxt.tokens > self.max_batch_tokens:
                    break
                batch.append(self._pending.popleft())
                tokens += nxt.tokens
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # A cancelled future (its client went away while queued) is skipped.
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            groups: dict[float, list[_Item]] = {}
            for item in live:
                groups.setdefault(item.temperature, []).append(item)
            for temperature, items in groups.items():
                try:
                    self._run_group(items, temperature)
                except BaseException as exc:  # never leave a caller waiting forever
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise

    def _run_group(self, items: list[_Item], temperature: float) -> None:
        seqs = [s for item in items for s in item.sequences]
        top_k = max(item.top_k for item in items)
        started = time.monotonic()
        wait = max(started - item.enqueued for item in items)
        ok = True
        try:
            results = self.backend.topk(seqs, top_k, temperature)
        except Exception as exc:
            ok = False
            results = None
            error: BaseException = exc
        elapsed = time.monotonic() - started
        self.engine_calls += 1
        self.items_served += len(items)
        if self.on_batch is not None:
            # Metrics must never take the engine thread down.
            with contextlib.suppress(Exception):
                self.on_batch(
                    BatchStats(
                        items=len(items),
                        sequences=len(seqs),
                        tokens=sum(len(s) for s in seqs),
                        seconds=elapsed,
                        queue_wait_seconds=wait,
                        tokens_by_source=_sum_by(items, lambda i: i.tokens),
                        sequences_by_source=_sum_by(items, lambda i: len(i.sequences)),
                        ok=ok,
                    )
                )
        if results is None:
            if len(items) == 1:
                items[0].future.set_exception(error)
                return
            # One bad item must not fail its neighbours: rerun each on its own.
            for item in items:
                if item.future.done():
                    continue
                try:
                    item.future.set_result(
                        self.backend.topk(item.sequences, item.top_k, temperature)
                    )
                except Exception as exc:
                    item.future.set_exception(exc)
            return
        start = 0
        for item in items:
            part = results[start : start + len(item.sequences)]
            start += len(item.sequences)
            if item.top_k != top_k:
                part = [
                    TopK(
                        ids=np.ascontiguousarray(r.ids[:, : item.top_k]),
                        logprobs=np.ascontiguousarray(r.logprobs[:, : item.top_k]),
                    )
                    for r in part
                ]
            item.future.set_result(part)


def _sum_by(items: list[_Item], value: Callable[[_Item], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item.source] = out.get(item.source, 0) + value(item)
    return out


class BatchedBackend:
    """A backend look-alike whose `topk` runs on the batcher's engine thread.

    Precompute jobs get this instead of the engine itself, so a job and the REST path never
    run the engine concurrently and a job's chunks are batched with live requests. Every
    other attribute (`info`, `tokenizer`, `validate`, ...) is the wrapped backend's.
    `close()` does nothing: the service owns the engine.
    """

    def __init__(self, backend: TeacherBackend, batcher: DynamicBatcher, source: str = "job"):
        self._backend = backend
        self._batcher = batcher
        self._source = source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def topk(
        self, sequences: Sequence[Sequence[int]], top_k: int, temperature: float = 1.0
    ) -> list[TopK]:
        seqs, top_k, temperature = self._backend.validate(sequences, top_k, temperature)
        return self._batcher.submit(seqs, top_k, temperature, source=self._source).result()

    def close(self) -> None:
        pass

    def __enter__(self) -> BatchedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BatchStats", "BatchedBackend", "DynamicBatcher", "ShuttingDown"]
