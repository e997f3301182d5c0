"""Errors of the teacher service: one JSON shape, `{"detail": "<field>: <message>", "field"}`,
for every refusal; the handlers that map validation, body-parse and unexpected errors onto it;
and the mapping of service errors (backend, jobs) to statuses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from todi.common.errors import TodiError
from todi.services.backends import BackendError

_log = logging.getLogger("todi.services.api")


class ApiError(Exception):
    """An HTTP error with a JSON body naming the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        self.status = status
        self.field = field
        self.message = f"{field}: {message}" if field and not message.startswith(field) else message
        super().__init__(self.message)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.field)


def error_response(
    status: int, message: str, field: str | None = None, headers=None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"detail": message}
    if field:
        body["field"] = field
    body.update(extra)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


def parse_reason(cause: BaseException | None) -> str:
    """Why json.loads refused a body, in words that name no server internals."""
    if isinstance(cause, UnicodeDecodeError):
        return f"not valid UTF-8 at byte {cause.start}"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "an integer has too many digits (limit 4300)"
    return type(cause).__name__ if cause is not None else "unparseable"


class PathScrubber:
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


def loc_to_field(loc: tuple | list) -> str:
    """('body', 'input_ids', 0, 3) -> 'input_ids[0][3]'."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def install_error_handlers(app: FastAPI, scrub: PathScrubber) -> None:
    """Every error as `{"detail", "field"}`; `scrub` takes server paths out of messages."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, scrub(exc.message), exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 "There was an error parsing the body" for a body json.loads
        # refuses with anything but JSONDecodeError: invalid UTF-8, an integer over
        # Python's 4300-digit limit, nesting deeper than the recursion limit. One rule for
        # every unparseable body: 422 naming `body` and the reason.
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return error_response(
                422, f"body: malformed JSON ({parse_reason(exc.__cause__)})", "body"
            )
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors()[:20]:
            field = loc_to_field(e.get("loc", ()))
            msg = str(e.get("msg", "invalid"))
            if e.get("type") == "json_invalid":
                field, msg = "body", f"malformed JSON ({e.get('ctx', {}).get('error', msg)})"
            errors.append({"field": field, "message": msg})
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        return error_response(
            422, f"{first['field']}: {first['message']}", first["field"], errors=errors
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The message may hold server paths or internals: it goes to the log, not the body.
        _log.error("unexpected error in a request", exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


def job_or_404(call: Callable[[str], Any], job_id: str) -> Any:
    from todi.services.jobs import JobNotFoundError

    try:
        return call(job_id)
    except JobNotFoundError:
        raise ApiError(404, f"no job {job_id!r}", "job_id") from None


def job_error(exc: TodiError) -> ApiError | TodiError:
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


def backend_422(exc: BackendError, field: str) -> ApiError:
    """A backend refusal as 422; sequence errors are renamed to the request's field."""
    name = exc.field
    message = str(exc)
    if field == "texts" and name.startswith("input_ids"):
        name = "texts" + name[len("input_ids") :]
        message = "texts" + message[len("input_ids") :]
    return ApiError(422, message, name)
