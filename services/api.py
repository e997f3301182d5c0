"""The teacher service: FastAPI app over one engine (dynamic batching) and precompute jobs.

Routes (OpenAPI at /docs):

    GET    /healthz            liveness (no auth)
    GET    /metrics            Prometheus text format (no auth)
    GET    /v1/teacher         what is served: model, backend, vocab_size, tokenizer_sha256, ...
    POST   /v1/logprobs        top-k log-probs of token sequences or texts; JSON or Arrow IPC
    POST   /v1/jobs            precompute a dataset into a shard set -> 202 {job_id}
    GET    /v1/jobs            list jobs
    GET    /v1/jobs/{job_id}   progress: state, sequences/tokens done/total, tokens/s, ETA, error
    DELETE /v1/jobs/{job_id}   cancel (the shard set keeps its whole shards: a valid partial set)

For a sequence of length L a result has L - 1 rows; row t holds the k most probable next
tokens after x[0..t] and their log-probs log_softmax(z / T) over the full vocabulary, in
descending order: exactly a shard row with prompt_len = 0.

Every error is JSON `{"detail": "<field>: <message>", "field": "<field>"}` (field when one is
to blame). Order of the outer layers: metrics (counts everything, 401/413 included) ->
API-key check for /v1 (before the body is read) -> body-size limit -> routes.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from todi.common.errors import TodiError
from todi.services.backends import BackendError, TeacherBackend, TopK, create_backend
from todi.services.backends.base import MAX_TEMPERATURE, MIN_TEMPERATURE
from todi.services.batcher import BatchedBackend, BatchStats, DynamicBatcher, ShuttingDown
from todi.services.config import JobSpec
from todi.services.settings import ServiceSettings
from todi.storage.schema import ARROW_SCHEMA, content_sample_id

ARROW_STREAM = "application/vnd.apache.arrow.stream"

# The Arrow response: the shard schema's logical columns, with the top-k decoded (nested
# lists instead of codec bytes), so a program gets exactly what a shard row decodes to.
ARROW_RESPONSE_SCHEMA = pa.schema(
    [
        ARROW_SCHEMA.field("sample_id"),
        ARROW_SCHEMA.field("input_ids"),
        ARROW_SCHEMA.field("prompt_len"),
        pa.field(ARROW_SCHEMA.field("topk_ids").name, pa.list_(pa.list_(pa.int32())), False),
        pa.field(ARROW_SCHEMA.field("topk_logprobs").name, pa.list_(pa.list_(pa.float32())), False),
    ]
)
ARROW_METADATA_KEY = b"todi"
_log = logging.getLogger("todi.services.api")


# ----------------------------------------------------------------------------------------
# errors
class ApiError(Exception):
    """An HTTP error with a JSON body naming the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        self.status = status
        self.field = field
        self.message = f"{field}: {message}" if field and not message.startswith(field) else message
        super().__init__(self.message)

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.field)


def _error(
    status: int, message: str, field: str | None = None, headers=None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"detail": message}
    if field:
        body["field"] = field
    body.update(extra)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


def _parse_reason(cause: BaseException | None) -> str:
    """Why json.loads refused a body, in words that name no server internals."""
    if isinstance(cause, UnicodeDecodeError):
        return f"not valid UTF-8 at byte {cause.start}"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "an integer has too many digits (limit 4300)"
    return type(cause).__name__ if cause is not None else "unparseable"


class _PathScrubber:
    """Replaces the server's roots in a message by their names: error bodies never show
    where the server keeps its files (paths a client gave stay relative to the root)."""

    def __init__(self, storage_root: Path, dataset_root: Path | None) -> None:
        roots = [(str(storage_root), "<storage_root>")]
        if dataset_root is not None:
            roots.append((str(dataset_root), "<dataset_root>"))
        # The longest first: a dataset root inside the storage root keeps its own name.
        self.roots = sorted(roots, key=lambda r: -len(r[0]))

    def __call__(self, message: str) -> str:
        for root, name in self.roots:
            message = message.replace(root + "/", "").replace(root, name)
        return message


def _loc_to_field(loc: tuple | list) -> str:
    """('body', 'input_ids', 0, 3) -> 'input_ids[0][3]'."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


# ----------------------------------------------------------------------------------------
# request / response models (for validation and the OpenAPI document)
class LogprobsRequest(BaseModel):
    """Either `input_ids` (token-id lists) or `texts` (tokenized by the teacher's tokenizer).

    The limits that depend on the server (max sequences, tokens, characters, max_top_k,
    max_model_len, vocab_size) are enforced by the routes and published in the OpenAPI
    document (`_publish_limits`)."""

    model_config = ConfigDict(
        extra="forbid",
        # Exactly one of the two (checked in `_sequences`), declared for generated clients.
        json_schema_extra={"oneOf": [{"required": ["input_ids"]}, {"required": ["texts"]}]},
    )

    input_ids: list[list[Annotated[StrictInt, Field(ge=0)]]] | None = Field(
        None, description="Token sequences (each >= 2 tokens).", examples=[[[504, 3575, 282]]]
    )
    texts: list[StrictStr] | None = Field(None, description="Texts, tokenized by the teacher.")
    top_k: StrictInt = Field(ge=1, description="How many next tokens per position (<= max_top_k).")
    temperature: float | None = Field(
        None,
        strict=True,  # a JSON number: "0.5" is refused
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Softmax temperature T (a JSON number). Default: the engine's one "
        "temperature (a vllm/remote engine serves exactly one), else 1.0.",
    )


class SequenceResult(BaseModel):
    input_ids: list[int]
    topk_ids: list[list[int]] = Field(description="[L-1][k]; row t predicts token t+1.")
    topk_logprobs: list[list[float]] = Field(description="[L-1][k] full-vocabulary log-probs.")


class LogprobsResponse(BaseModel):
    model: str
    top_k: int
    temperature: float
    results: list[SequenceResult]


class TeacherResponse(BaseModel):
    model: str
    backend: str
    vocab_size: int
    tokenizer_sha256: str
    max_top_k: int
    max_model_len: int
    weights_sha256: str | None = None
    logprobs_mode: str | None = None
    temperatures: list[float] | None = None


class JobAccepted(BaseModel):
    """`POST /v1/jobs` answer; follow the job at `GET /v1/jobs/{job_id}`."""

    job_id: str
    state: str
    out: str


class ErrorResponse(BaseModel):
    detail: str
    field: str | None = None


_ERRORS = {
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "body, sequences or tokens over the limit"},
    422: {"model": ErrorResponse, "description": "bad input; `field` names it"},
}


# ----------------------------------------------------------------------------------------
# metrics
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
        listed = [_progress_dict(p) for p in jobs.list()] if jobs is not None else []
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


def _progress_dict(progress: Any) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------
# ASGI layers
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


async def _send_json(send: Callable, status: int, body: dict, headers=()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _MetricsLayer:
    """Counts every response by route template and status; observes latency."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes_of: Callable) -> None:
        self.app, self.metrics, self.routes_of = app, metrics, routes_of

    def _route(self, scope: dict) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        from starlette.routing import Match

        for r in self.routes_of():
            try:
                if r.matches(scope)[0] == Match.FULL:
                    return r.path
            except Exception:
                continue
        return "other"  # unknown paths share one label: no unbounded cardinality

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, capture)
        finally:
            route, method = self._route(scope), scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


class _AuthLayer:
    """`Authorization: Bearer <key>` on every /v1 route, checked before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if (
            self.key is None
            or scope["type"] != "http"
            or not (path == "/v1" or path.startswith("/v1/"))
        ):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        # compare_digest on the whole token: time does not depend on where they differ.
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        if not ok:
            detail = (
                "missing API key: send Authorization: Bearer <key>"
                if not given
                else "invalid API key"
            )
            await _send_json(
                send, 401, {"detail": detail}, headers=[(b"www-authenticate", b"Bearer")]
            )
            return
        await self.app(scope, receive, send)


class _BodyLimitLayer:
    """413 for bodies over `limit` bytes (declared or streamed), before any parsing."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = {
            "detail": f"body: request body exceeds max_body_bytes={self.limit}",
            "field": "body",
        }
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"detail": "body: bad Content-Length"})
                    return
                if declared > self.limit:
                    await _send_json(send, 413, too_big)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _send_json(send, 413, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------
# helpers
def _arrow_body(seqs: list[list[int]], results: list[TopK], meta: dict[str, Any]) -> bytes:
    """Results as one Arrow IPC stream record batch (see ARROW_RESPONSE_SCHEMA)."""
    k = int(meta["top_k"])
    rows = np.array([r.ids.shape[0] for r in results], dtype=np.int64)
    outer = np.zeros(len(results) + 1, dtype=np.int32)
    np.cumsum(rows, out=outer[1:])
    inner = np.arange(0, int(rows.sum()) * k + 1, k, dtype=np.int32)
    empty_i = np.zeros((0,), np.int32)
    empty_f = np.zeros((0,), np.float32)
    ids = np.concatenate([r.ids.reshape(-1) for r in results] or [empty_i]).astype(np.int32)
    lps = np.concatenate([r.logprobs.reshape(-1) for r in results] or [empty_f]).astype(np.float32)

    def nested(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        inner_arr = pa.ListArray.from_arrays(pa.array(inner), pa.array(values, typ))
        return pa.ListArray.from_arrays(pa.array(outer), inner_arr)

    schema = ARROW_RESPONSE_SCHEMA.with_metadata({ARROW_METADATA_KEY: json.dumps(meta)})
    batch = pa.RecordBatch.from_arrays(
        [
            pa.array([content_sample_id(s) for s in seqs], pa.string()),
            pa.array([np.asarray(s, dtype=np.int32) for s in seqs], pa.list_(pa.int32())),
            pa.array(np.zeros(len(seqs), dtype=np.int32)),
            nested(ids, pa.int32()),
            nested(lps, pa.float32()),
        ],
        schema=schema,
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def _json_body(seqs: list[list[int]], results: list[TopK], meta: dict[str, Any]) -> bytes:
    out = {
        **meta,
        "results": [
            {
                "input_ids": s,
                "topk_ids": r.ids.tolist(),
                "topk_logprobs": r.logprobs.tolist(),
            }
            for s, r in zip(seqs, results, strict=True)
        ],
    }
    return json.dumps(out, separators=(",", ":")).encode()


def _wants_arrow(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip() == ARROW_STREAM for part in accept.split(","))


# ----------------------------------------------------------------------------------------
class ServiceState:
    """What the routes share; filled in by the lifespan."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.backend: TeacherBackend | None = None
        self.batcher: DynamicBatcher | None = None
        self.jobs: Any = None
        self.started = time.time()


def create_app(
    settings: ServiceSettings,
    backend: TeacherBackend | None = None,
    *,
    own_backend: bool = False,
) -> FastAPI:
    """The FastAPI app. Without `backend`, the engine is created at startup inside the
    serving process (vLLM's engine subprocess must be spawned from there) and closed at
    shutdown; a given backend is used as is and closed at shutdown only if `own_backend`."""
    state = ServiceState(settings)
    storage_root = Path(settings.storage_root)
    metrics = ServiceMetrics(lambda: state.batcher, lambda: state.jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        storage_root.mkdir(parents=True, exist_ok=True)
        owned = backend is None or own_backend
        engine = (
            backend
            if backend is not None
            else create_backend(settings.backend, settings.model, **settings.backend_options)
        )
        state.backend = engine
        state.batcher = DynamicBatcher(
            engine,
            window_s=settings.batch_window_ms / 1000.0,
            max_batch_tokens=settings.max_batch_tokens,
            on_batch=metrics.on_batch,
        )
        state.batcher.start()
        from todi.services.jobs import JobManager

        model_dir = getattr(engine, "model_dir", None)
        # Jobs share the engine through the batcher (never concurrently with requests);
        # all active jobs run at once, interleaved on the engine thread.
        state.jobs = JobManager(
            storage_root,
            BatchedBackend(engine, state.batcher),
            max_concurrent=settings.max_concurrent_jobs,
            max_jobs=settings.max_concurrent_jobs,
            dataset_root=settings.dataset_root,
            ray_backend=(
                {
                    "backend": engine.info.backend,
                    "model": str(model_dir),
                    **settings.backend_options,
                }
                if model_dir is not None
                else None
            ),
        )
        # Jobs that were queued or running when the last server died continue now.
        await run_in_threadpool(state.jobs.recover)
        try:
            yield
        finally:
            # Running jobs stop at their next batch and stay queued in their records:
            # the next server resumes them.
            await run_in_threadpool(state.jobs.shutdown)
            state.batcher.stop()
            if owned:
                engine.close()

    app = FastAPI(
        title="todi teacher service",
        version="1",
        description=(
            "Top-k teacher log-probs for offline distillation. Every /v1 route needs "
            "`Authorization: Bearer <key>` when the server has TODI_API_KEY set."
        ),
        lifespan=lifespan,
    )
    app.state.todi = state
    app.state.metrics = metrics
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The OpenAPI document with every limit the server enforces (`_publish_limits`);
        not cached until the engine is loaded (its max_top_k, max_model_len, vocab)."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate_openapi()
        if state.backend is None:
            app.openapi_schema = None
        else:
            _publish_limits(schema, settings, state.backend.info)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    scrub = _PathScrubber(storage_root, settings.dataset_root)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, scrub(exc.message), exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 "There was an error parsing the body" for a body json.loads
        # refuses with anything but JSONDecodeError: invalid UTF-8, an integer over
        # Python's 4300-digit limit, nesting deeper than the recursion limit. One rule for
        # every unparseable body: 422 naming `body` and the reason.
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return _error(422, f"body: malformed JSON ({_parse_reason(exc.__cause__)})", "body")
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors()[:20]:
            field = _loc_to_field(e.get("loc", ()))
            msg = str(e.get("msg", "invalid"))
            if e.get("type") == "json_invalid":
                field, msg = "body", f"malformed JSON ({e.get('ctx', {}).get('error', msg)})"
            errors.append({"field": field, "message": msg})
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        return _error(422, f"{first['field']}: {first['message']}", first["field"], errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The message may hold server paths or internals: it goes to the log, not the body.
        _log.error("unexpected error in a request", exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    bearer = HTTPBearer(auto_error=False, description="TODI_API_KEY of the server")

    # -- unauthenticated -----------------------------------------------------------------
    @app.get("/healthz", tags=["service"], responses={503: {"model": ErrorResponse}})
    async def healthz() -> dict[str, Any]:
        """Liveness: 200 once the engine is loaded; 503 if its thread or the engine is gone."""
        b = state.batcher
        if b is None or not b.alive:
            raise ApiError(503, "the engine thread is not running")
        dead = state.backend.health() if state.backend is not None else None
        if dead is not None:
            raise ApiError(503, f"engine: {dead}")
        return {
            "status": "ok",
            "backend": state.backend.info.backend if state.backend else None,
            "queue_depth": b.queue_depth if b else 0,
            "uptime_s": round(time.time() - state.started, 3),
        }

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- /v1 (the auth layer guards these; the Security dependency documents it) -----------
    v1 = APIRouter(prefix="/v1", dependencies=[Security(bearer)], responses={401: _ERRORS[401]})

    @v1.get("/teacher", response_model=TeacherResponse, tags=["teacher"])
    async def teacher() -> dict[str, Any]:
        """The served teacher: shard sets record the same fields."""
        return state.backend.info.to_dict()

    @v1.post(
        "/logprobs",
        response_model=LogprobsResponse,
        tags=["teacher"],
        responses={
            200: {"content": {ARROW_STREAM: {}}, "description": "JSON, or Arrow IPC on Accept"},
            413: _ERRORS[413],
            422: _ERRORS[422],
            503: {"model": ErrorResponse, "description": "the server is shutting down"},
        },
    )
    async def logprobs(body: LogprobsRequest, request: Request) -> Response:
        """Top-k next-token log-probs for every position of each sequence.

        Send `Accept: application/vnd.apache.arrow.stream` for an Arrow IPC stream with
        columns sample_id, input_ids, prompt_len (0), topk_ids, topk_logprobs.
        """
        seqs, field = await _sequences(body)
        engine = state.backend
        try:
            temperature = body.temperature
            if temperature is None:
                temperature = engine.info.default_temperature
            seqs, top_k, temperature = await run_in_threadpool(
                engine.validate, seqs, body.top_k, temperature
            )
        except BackendError as exc:
            raise _backend_422(exc, field) from None
        try:
            future = state.batcher.submit(seqs, top_k, temperature)
            results = await asyncio.wrap_future(future)
        except BackendError as exc:
            raise _backend_422(exc, field) from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc)) from None
        if not all(np.isfinite(r.logprobs).all() for r in results):
            # The temperature range keeps log_softmax finite; a backend that still gives
            # NaN / inf never puts it in a 200 (NaN is not JSON).
            raise ApiError(422, f"{temperature:g} gives non-finite log-probs", "temperature")
        meta = {"model": engine.info.model, "top_k": top_k, "temperature": temperature}
        if _wants_arrow(request):
            data = await run_in_threadpool(_arrow_body, seqs, results, meta)
            return Response(data, media_type=ARROW_STREAM)
        data = await run_in_threadpool(_json_body, seqs, results, meta)
        return Response(data, media_type="application/json")

    async def _sequences(body: LogprobsRequest) -> tuple[list[list[int]], str]:
        s = settings
        if (body.input_ids is None) == (body.texts is None):
            raise ApiError(422, "give exactly one of input_ids or texts", "input_ids")
        field = "input_ids" if body.input_ids is not None else "texts"
        items = body.input_ids if body.input_ids is not None else body.texts
        if not items:
            raise ApiError(422, "must hold at least one sequence", field)
        if len(items) > s.max_sequences_per_request:
            raise ApiError(
                413,
                f"{len(items)} sequences exceed max_sequences_per_request="
                f"{s.max_sequences_per_request}",
                field,
            )
        if body.texts is not None:
            # Characters first (free), then tokens as they are counted: a 15 MB body is
            # refused before any tokenizing, and tokenizing stops at the token limit.
            # Tokenizing is CPU work: a worker thread, never the event loop or engine thread.
            chars = sum(len(t) for t in body.texts)
            if chars > s.effective_max_chars:
                raise ApiError(
                    413,
                    f"{chars} characters exceed max_chars_per_request={s.effective_max_chars}",
                    field,
                )
            seqs = await run_in_threadpool(
                _tokenize, state.backend.tokenizer, body.texts, s.max_tokens_per_request
            )
        else:
            seqs = body.input_ids
        total = sum(len(x) for x in seqs)
        if total > s.max_tokens_per_request:
            raise ApiError(
                413,
                f"{total} tokens exceed max_tokens_per_request={s.max_tokens_per_request}",
                field,
            )
        return seqs, field

    # -- jobs ----------------------------------------------------------------------------
    @v1.post(
        "/jobs",
        status_code=202,
        response_model=JobAccepted,
        tags=["jobs"],
        responses={
            400: {"model": ErrorResponse, "description": "output path outside the storage root"},
            409: {"model": ErrorResponse, "description": "output owned by a different job"},
            422: _ERRORS[422],
            429: {"model": ErrorResponse, "description": "max_concurrent_jobs reached"},
            503: {"model": ErrorResponse, "description": "the server is shutting down"},
        },
    )
    async def submit_job(spec: JobSpec) -> dict[str, Any]:
        """Precompute a dataset into a shard set under the storage root.

        `out` is relative to the storage root (or absolute inside it); a relative `dataset`
        too. Re-submitting the same job (same out and parameters) returns its id and resumes
        it: only samples not yet in whole shards are computed.
        """
        if "temperature" not in spec.model_fields_set:
            spec = spec.model_copy(update={"temperature": state.backend.info.default_temperature})
        try:
            state.backend.validate([[0, 0]], spec.top_k, spec.temperature)
            job_id = await run_in_threadpool(state.jobs.submit, spec)
        except TodiError as exc:
            raise _job_error(exc) from None
        except OSError as exc:  # a path the OS refuses (too long, a loop, no permission)
            name = str(exc.filename or "")
            field = "out" if name.startswith(str(storage_root)) else "dataset"
            raise ApiError(422, f"{field}: {exc.strerror or exc}: {name}", field) from None
        p = state.jobs.get(job_id)
        return {"job_id": job_id, "state": p.state, "out": p.out}

    @v1.get("/jobs", tags=["jobs"])
    async def list_jobs() -> dict[str, Any]:
        """Every job this server knows (also those recovered after a restart)."""
        return {"jobs": [_progress_dict(p) for p in state.jobs.list()]}

    @v1.get("/jobs/{job_id}", tags=["jobs"], responses={404: {"model": ErrorResponse}})
    async def get_job(job_id: str) -> dict[str, Any]:
        """Progress: state, sequences and tokens done / total, tokens/s, ETA, error."""
        return _progress_dict(_job_or_404(state.jobs.get, job_id))

    @v1.delete("/jobs/{job_id}", tags=["jobs"], responses={404: {"model": ErrorResponse}})
    async def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel: the whole shards already committed stay a valid (incomplete) shard set.

        A running job stops after its current batch; poll until `state` is `cancelled`.
        """
        return _progress_dict(_job_or_404(state.jobs.cancel, job_id))

    app.include_router(v1)

    # Outer layers, innermost first: body limit, then auth, then metrics (outermost).
    app.add_middleware(_BodyLimitLayer, limit=settings.max_body_bytes)
    app.add_middleware(
        _AuthLayer,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
    )
    app.add_middleware(_MetricsLayer, metrics=metrics, routes_of=lambda: app.routes)
    return app


def _array_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The array schema of an optional list property (`anyOf: [array, null]`)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "array":
            return branch
    return prop


def _publish_limits(schema: dict[str, Any], settings: ServiceSettings, info: Any) -> None:
    """Declare in the OpenAPI document the ranges the routes enforce, so generated clients
    and schema-driven fuzzers can build valid requests: list lengths (413 past them),
    max_top_k, max_model_len and the vocabulary (422 past them)."""
    comps = schema.get("components", {}).get("schemas", {})
    req = comps.get("LogprobsRequest", {}).get("properties", {})
    if req:
        seqs = _array_branch(req["input_ids"])
        seqs.update(minItems=1, maxItems=settings.max_sequences_per_request)
        seqs["items"].update(minItems=2, maxItems=info.max_model_len)
        seqs["items"]["items"].update(minimum=0, maximum=info.vocab_size - 1)
        texts = _array_branch(req["texts"])
        texts.update(minItems=1, maxItems=settings.max_sequences_per_request)
        texts["items"].update(minLength=1, maxLength=settings.effective_max_chars)
        req["top_k"]["maximum"] = info.max_top_k
    job = comps.get("JobSpec", {}).get("properties", {})
    if job:
        job["top_k"]["maximum"] = min(job["top_k"].get("maximum", info.max_top_k), info.max_top_k)
    if info.temperatures is not None:
        for props in (req, job):
            if props:
                t = props["temperature"]
                t.pop("anyOf", None)
                t.update(type="number", enum=list(info.temperatures))


def _job_or_404(call: Callable[[str], Any], job_id: str) -> Any:
    from todi.services.jobs import JobNotFoundError

    try:
        return call(job_id)
    except JobNotFoundError:
        raise ApiError(404, f"no job {job_id!r}", "job_id") from None


def _job_error(exc: TodiError) -> ApiError | TodiError:
    """A refused job submission, mapped by type to its HTTP status (the field from the error)."""
    from todi.services.datasets import DatasetError
    from todi.services.jobs import JobConflictError, JobError, JobLimitError, JobPathError

    statuses = (
        (BackendError, 422, None),
        (JobPathError, 400, "out"),
        (JobLimitError, 429, None),
        (JobConflictError, 409, "out"),
        (DatasetError, 422, "dataset"),
    )
    for kind, status, default_field in statuses:
        if isinstance(exc, kind):
            return ApiError(status, str(exc), exc.field or default_field)
    if isinstance(exc, JobError):  # the manager is shutting down
        return ApiError(503, str(exc), exc.field)
    return ApiError(422, str(exc), exc.field)


def _tokenize(tokenizer: Any, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Tokenize text by text; stop once the count passes `max_tokens` (the caller then
    answers 413 from the partial count: the rest is never tokenized)."""
    out: list[list[int]] = []
    total = 0
    for text in texts:
        ids = [int(t) for t in tokenizer(text)["input_ids"]]
        out.append(ids)
        total += len(ids)
        if total > max_tokens:
            break
    return out


def _backend_422(exc: BackendError, field: str) -> ApiError:
    """A backend refusal as 422; sequence errors are renamed to the request's field."""
    name = exc.field
    message = str(exc)
    if field == "texts" and name.startswith("input_ids"):
        name = "texts" + name[len("input_ids") :]
        message = "texts" + message[len("input_ids") :]
    return ApiError(422, message, name)
