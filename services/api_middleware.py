"""The ASGI layers around the routes, outermost first: metrics (counts everything, 401/413
included) -> API-key check for /v1 (before the body is read) -> body-size limit."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable

from todi.services.api_metrics import ServiceMetrics

# ASGI layers
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


async def send_json(send: Callable, status: int, body: dict, headers=()) -> None:
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


class MetricsLayer:
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


class AuthLayer:
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
            await send_json(
                send, 401, {"detail": detail}, headers=[(b"www-authenticate", b"Bearer")]
            )
            return
        await self.app(scope, receive, send)


class BodyLimitLayer:
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
                    await send_json(send, 400, {"detail": "body: bad Content-Length"})
                    return
                if declared > self.limit:
                    await send_json(send, 413, too_big)
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
                await send_json(send, 413, too_big)
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
