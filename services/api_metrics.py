"""Prometheus metrics of the teacher service, in an app-owned registry."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel

from todi.services.batcher import BatchStats, DynamicBatcher


class ServiceMetrics:
    """Prometheus metrics in an app-owned registry (several apps per process never clash)."""

    def __init__(self, batcher_ref: Callable[[], DynamicBatcher | None], jobs_ref) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "todi_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "todi_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.engine_calls = Counter(
            "todi_engine_calls", "backend.topk calls made by the engine thread", registry=r
        )
        self.engine_errors = Counter("todi_engine_errors", "engine calls that raised", registry=r)
        self.batch_items = Histogram(
            "todi_engine_batch_items",
            "requests / job chunks gathered into one engine call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "todi_engine_batch_tokens",
            "tokens in one engine call",
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536, 262144),
            registry=r,
        )
        self.engine_seconds = Histogram(
            "todi_engine_call_seconds",
            "engine time per call",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.queue_wait = Histogram(
            "todi_engine_queue_wait_seconds",
            "longest queue wait in a gathered call",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
            registry=r,
        )
        self.tokens = Counter(
            "todi_engine_tokens", "tokens scored by the engine", ["source"], registry=r
        )
        self.sequences = Counter(
            "todi_engine_sequences", "sequences scored by the engine", ["source"], registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()
        self._recent_lock = threading.Lock()
        self.window_s = 10.0
        Gauge(
            "todi_engine_tokens_per_second", "tokens/s scored over the last 10 s", registry=r
        ).set_function(self.tokens_per_second)
        Gauge(
            "todi_engine_queue_depth", "requests / job chunks waiting for the engine", registry=r
        ).set_function(lambda: b.queue_depth if (b := batcher_ref()) else 0)
        Gauge(
            "todi_engine_queued_tokens", "tokens waiting for the engine", registry=r
        ).set_function(lambda: b.queued_tokens if (b := batcher_ref()) else 0)
        r.register(_JobCollector(jobs_ref))

    def on_batch(self, stats: BatchStats) -> None:
        self.engine_calls.inc()
        if not stats.ok:
            self.engine_errors.inc()
            return
        self.batch_items.observe(stats.items)
        self.batch_tokens.observe(stats.tokens)
        self.engine_seconds.observe(stats.seconds)
        self.queue_wait.observe(stats.queue_wait_seconds)
        for source, n in stats.tokens_by_source.items():
            self.tokens.labels(source).inc(n)
        for source, n in stats.sequences_by_source.items():
            self.sequences.labels(source).inc(n)
        with self._recent_lock:
            self._recent.append((time.monotonic(), stats.tokens))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._recent_lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JobCollector:
    """Job progress gauges, read from the JobManager at scrape time."""

    def __init__(self, jobs_ref) -> None:
        self.jobs_ref = jobs_ref

    def describe(self):
        return []

    def collect(self):
        jobs = self.jobs_ref()
        listed = [progress_dict(p) for p in jobs.list()] if jobs is not None else []
        by_state = GaugeMetricFamily("todi_jobs", "jobs by state", labels=["state"])
        counts: dict[str, int] = {}
        for p in listed:
            counts[p["state"]] = counts.get(p["state"], 0) + 1
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        fields = (
            ("sequences_done", "sequences done"),
            ("sequences_total", "sequences in the dataset"),
            ("tokens_done", "tokens done"),
            ("tokens_total", "tokens in the dataset"),
            ("tokens_per_second", "job throughput"),
        )
        for key, doc in fields:
            fam = GaugeMetricFamily(f"todi_job_{key}", f"per job: {doc}", labels=["job_id"])
            for p in listed:
                value = p.get(key)
                if isinstance(value, int | float) and math.isfinite(value):
                    fam.add_metric([str(p["job_id"])], float(value))
            yield fam


def progress_dict(progress: Any) -> dict[str, Any]:
    """JobProgress (pydantic model or dataclass) -> JSON-ready dict."""
    if isinstance(progress, BaseModel):
        data = progress.model_dump(mode="json")
    elif is_dataclass(progress):
        data = asdict(progress)
    else:
        data = dict(progress)
    for k, v in list(data.items()):
        if isinstance(v, Path):
            data[k] = str(v)
        elif isinstance(v, float) and not math.isfinite(v):
            data[k] = None
    return data
