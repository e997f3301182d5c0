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

Split as vLLM's entrypoints are: the wire format in `api_protocol`, errors and their handlers
in `api_errors`, metrics in `api_metrics`, the ASGI layers in `api_middleware`; this module
holds the app factory, its lifespan, the OpenAPI limits and one router per resource.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from todi.common.errors import TodiError
from todi.services.api_errors import (
    ApiError,
    PathScrubber,
    backend_422,
    install_error_handlers,
    job_error,
    job_or_404,
)
from todi.services.api_metrics import ServiceMetrics, progress_dict
from todi.services.api_middleware import AuthLayer, BodyLimitLayer, MetricsLayer
from todi.services.api_protocol import (
    ARROW_METADATA_KEY,
    ARROW_RESPONSE_SCHEMA,
    ARROW_STREAM,
    ERRORS,
    ErrorResponse,
    JobAccepted,
    LogprobsRequest,
    LogprobsResponse,
    TeacherResponse,
    arrow_body,
    json_body,
    wants_arrow,
)
from todi.services.backends import BackendError, TeacherBackend, create_backend
from todi.services.batcher import BatchedBackend, DynamicBatcher, ShuttingDown
from todi.services.config import JobSpec
from todi.services.precompute import check_spec
from todi.services.settings import ServiceSettings

__all__ = [
    "ARROW_METADATA_KEY",
    "ARROW_RESPONSE_SCHEMA",
    "ARROW_STREAM",
    "ApiError",
    "ServiceState",
    "create_app",
]

_SHUTTING_DOWN = {"model": ErrorResponse, "description": "the server is shutting down"}


class ServiceState:
    """What the routes share; filled in by the lifespan."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.backend: TeacherBackend | None = None
        self.batcher: DynamicBatcher | None = None
        self.jobs: Any = None
        self.started = time.time()


# ----------------------------------------------------------------------------------------
# the app
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
    metrics = ServiceMetrics(lambda: state.batcher, lambda: state.jobs)
    app = FastAPI(
        title="todi teacher service",
        version="1",
        description=(
            "Top-k teacher log-probs for offline distillation. Every /v1 route needs "
            "`Authorization: Bearer <key>` when the server has TODI_API_KEY set."
        ),
        lifespan=_lifespan(state, metrics, backend, own_backend),
    )
    app.state.todi = state
    app.state.metrics = metrics
    _install_openapi(app, state)
    install_error_handlers(app, PathScrubber(Path(settings.storage_root), settings.dataset_root))
    app.include_router(_service_router(state, metrics))
    bearer = HTTPBearer(auto_error=False, description="TODI_API_KEY of the server")
    # The auth layer guards /v1; the Security dependency documents it in OpenAPI.
    v1 = {"dependencies": [Security(bearer)], "responses": {401: ERRORS[401]}}
    app.include_router(_teacher_router(state), **v1)
    app.include_router(_jobs_router(state), **v1)
    # Outer layers, innermost first: body limit, then auth, then metrics (outermost).
    app.add_middleware(BodyLimitLayer, limit=settings.max_body_bytes)
    app.add_middleware(
        AuthLayer,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
    )
    app.add_middleware(MetricsLayer, metrics=metrics, routes_of=lambda: app.routes)
    return app


def _lifespan(
    state: ServiceState,
    metrics: ServiceMetrics,
    backend: TeacherBackend | None,
    own_backend: bool,
):
    """Startup: the engine, its batcher thread and the job manager (resuming the jobs the
    last server left); shutdown in reverse."""
    settings = state.settings
    storage_root = Path(settings.storage_root)

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
        state.jobs = _job_manager(state, engine)
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

    return lifespan


def _job_manager(state: ServiceState, engine: TeacherBackend):
    from todi.services.jobs import JobManager

    settings = state.settings
    model_dir = getattr(engine, "model_dir", None)
    # Jobs share the engine through the batcher (never concurrently with requests);
    # all active jobs run at once, interleaved on the engine thread.
    return JobManager(
        Path(settings.storage_root),
        BatchedBackend(engine, state.batcher),
        max_concurrent=settings.max_concurrent_jobs,
        max_jobs=settings.max_concurrent_jobs,
        dataset_root=settings.dataset_root,
        ray_backend=(
            {"backend": engine.info.backend, "model": str(model_dir), **settings.backend_options}
            if model_dir is not None
            else None
        ),
    )


# ----------------------------------------------------------------------------------------
# the OpenAPI document
def _install_openapi(app: FastAPI, state: ServiceState) -> None:
    """The OpenAPI document with every limit the server enforces (`_publish_limits`);
    not cached until the engine is loaded (its max_top_k, max_model_len, vocab)."""
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate_openapi()
        if state.backend is None:
            app.openapi_schema = None
        else:
            _publish_limits(schema, state.settings, state.backend.info)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


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


# ----------------------------------------------------------------------------------------
# routers: service (no key), teacher, jobs
def _service_router(state: ServiceState, metrics: ServiceMetrics) -> APIRouter:
    service_api = APIRouter(tags=["service"])

    @service_api.get("/healthz", responses={503: {"model": ErrorResponse}})
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

    @service_api.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return service_api


def _teacher_router(state: ServiceState) -> APIRouter:
    teacher_api = APIRouter(prefix="/v1", tags=["teacher"])

    @teacher_api.get("/teacher", response_model=TeacherResponse)
    async def teacher() -> dict[str, Any]:
        """The served teacher: shard sets record the same fields."""
        return state.backend.info.to_dict()

    @teacher_api.post(
        "/logprobs",
        response_model=LogprobsResponse,
        responses={
            200: {"content": {ARROW_STREAM: {}}, "description": "JSON, or Arrow IPC on Accept"},
            413: ERRORS[413],
            422: ERRORS[422],
            503: _SHUTTING_DOWN,
        },
    )
    async def logprobs(body: LogprobsRequest, request: Request) -> Response:
        """Top-k next-token log-probs for every position of each sequence.

        Send `Accept: application/vnd.apache.arrow.stream` for an Arrow IPC stream with
        columns sample_id, input_ids, prompt_len (0), topk_ids, topk_logprobs.
        """
        seqs, field = await _sequences(state, body)
        engine = state.backend
        temperature = body.temperature
        if temperature is None:
            temperature = engine.info.default_temperature
        try:
            seqs, top_k, temperature = await run_in_threadpool(
                engine.validate, seqs, body.top_k, temperature
            )
            results = await asyncio.wrap_future(state.batcher.submit(seqs, top_k, temperature))
        except BackendError as exc:
            raise backend_422(exc, field) from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc)) from None
        if not all(np.isfinite(r.logprobs).all() for r in results):
            # The temperature range keeps log_softmax finite; a backend that still gives
            # NaN / inf never puts it in a 200 (NaN is not JSON).
            raise ApiError(422, f"{temperature:g} gives non-finite log-probs", "temperature")
        meta = {"model": engine.info.model, "top_k": top_k, "temperature": temperature}
        if wants_arrow(request):
            data = await run_in_threadpool(arrow_body, seqs, results, meta)
            return Response(data, media_type=ARROW_STREAM)
        data = await run_in_threadpool(json_body, seqs, results, meta)
        return Response(data, media_type="application/json")

    return teacher_api


async def _sequences(state: ServiceState, body: LogprobsRequest) -> tuple[list[list[int]], str]:
    """The request's token sequences and the field they came from; 413 past a limit,
    checked cheapest first (sequences, characters, then tokens as they are counted)."""
    s = state.settings
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


def _jobs_router(state: ServiceState) -> APIRouter:
    jobs_api = APIRouter(prefix="/v1", tags=["jobs"])
    storage_root = str(state.settings.storage_root)

    @jobs_api.post(
        "/jobs",
        status_code=202,
        response_model=JobAccepted,
        responses={
            400: {"model": ErrorResponse, "description": "output path outside the storage root"},
            409: {"model": ErrorResponse, "description": "output owned by a different job"},
            422: ERRORS[422],
            429: {"model": ErrorResponse, "description": "max_concurrent_jobs reached"},
            503: _SHUTTING_DOWN,
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
            check_spec(state.backend, spec)
            job_id = await run_in_threadpool(state.jobs.submit, spec)
        except TodiError as exc:
            raise job_error(exc) from None
        except OSError as exc:  # a path the OS refuses (too long, a loop, no permission)
            name = str(exc.filename or "")
            field = "out" if name.startswith(storage_root) else "dataset"
            raise ApiError(422, f"{field}: {exc.strerror or exc}: {name}", field) from None
        p = state.jobs.get(job_id)
        return {"job_id": job_id, "state": p.state, "out": p.out}

    @jobs_api.get("/jobs")
    async def list_jobs() -> dict[str, Any]:
        """Every job this server knows (also those recovered after a restart)."""
        return {"jobs": [progress_dict(p) for p in state.jobs.list()]}

    @jobs_api.get("/jobs/{job_id}", responses={404: {"model": ErrorResponse}})
    async def get_job(job_id: str) -> dict[str, Any]:
        """Progress: state, sequences and tokens done / total, tokens/s, ETA, error."""
        return progress_dict(job_or_404(state.jobs.get, job_id))

    @jobs_api.delete("/jobs/{job_id}", responses={404: {"model": ErrorResponse}})
    async def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel: the whole shards already committed stay a valid (incomplete) shard set.

        A running job stops after its current batch; poll until `state` is `cancelled`.
        """
        return progress_dict(job_or_404(state.jobs.cancel, job_id))

    return jobs_api
