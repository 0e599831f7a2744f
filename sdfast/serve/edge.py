"""The ASGI edge around the app: the request-body limit, API-key auth, access log and request metrics, and the error shapes."""
from __future__ import annotations

import json
import logging
import secrets
import time
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from sdfast.serve.context import ServeSettings
    from sdfast.serve.metrics import Metrics

access_log = logging.getLogger("sdfast.access")
OPEN_PATHS = ("/health", "/ready")  # probes need no key
OPEN_PREFIXES = ("/v1/images/files/",)  # response_format=url images: their unguessable token is the credential


def authorized(key: str | None, path: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request may pass: no key set, an open path, or 'Authorization: Bearer KEY'."""
    if not key or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return True
    scheme, _, supplied = dict(headers).get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(supplied.strip().encode(), key.encode())


def error_response(status: int, message: str, field: str | None = None, headers: dict | None = None, path: str = "",
                   code: str | None = None) -> JSONResponse:
    """A1111 routes: {"error", "field"}; OpenAI routes: OpenAI's {"error": {"message", "type", "param", "code"}}."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": field, "code": code}}
    else:
        body = {"error": message, **({"field": field} if field else {})}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by Content-Length or while streaming (pure ASGI)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"request body over {self.limit >> 20} MiB", "body", path=scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        seen, started, refused = 0, False, False

        async def limited_receive():
            nonlocal seen, started, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # answer now; the app sees a client that went away and its replies are dropped
                refused = True
                if not started:
                    started = True
                    await too_large(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def app_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, app_send)


class Edge:
    """Auth, access log and request metrics around every request (pure ASGI: a disconnect stays visible to the routes)."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, responded = time.perf_counter(), [500], [False]
        path = scope.get("path", "")

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status[0], responded[0] = message["status"], True
            await send(message)

        if not authorized(self.settings.api_key, path, scope.get("headers") or []):
            response = error_response(401, "missing or wrong API key (Authorization: Bearer KEY)", "authorization",
                                      headers={"WWW-Authenticate": "Bearer"}, path=path)
            await response(scope, receive, tracking_send)
            return self._account(scope, status[0], started)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001 - one line to the client, never a traceback
            if not responded[0]:
                await error_response(500, f"internal error: {type(error).__name__}", path=path)(scope, receive, tracking_send)
            logging.getLogger("sdfast.serve").error("sdfast serve: %s on %s: %s", type(error).__name__, path, error)
        self._account(scope, status[0], started)

    def _account(self, scope, status: int, started: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.request_seconds.labels(endpoint).observe(seconds)
        client = scope.get("client")
        access_log.info(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "client": client[0] if client else None,
            "method": scope.get("method"), "path": scope.get("path"), "status": status, "ms": round(seconds * 1e3, 1),
        }))
