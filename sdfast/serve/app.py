"""The ASGI app: AUTOMATIC1111's /sdapi/v1 and OpenAI's /v1 over the server's models and its one Worker, with the error
handlers, probes and metrics."""
from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdfast import __version__
from sdfast.errors import EngineError, SdfastError
from sdfast.serve.a1111 import a1111_router
from sdfast.serve.controlnet_api import controlnet_router
from sdfast.serve.context import ServeContext, ServeSettings
from sdfast.serve.edge import BodyLimit, Edge, error_response
from sdfast.serve.metrics import Metrics
from sdfast.serve.models import ModelPool
from sdfast.serve.openai_api import openai_router
from sdfast.serve.progress import ProgressView
from sdfast.serve.schemas import FieldError
from sdfast.serve.worker import Cancelled, QueueFull, Worker

__all__ = ["ServeSettings", "create_app", "is_loopback", "wrap"]
CANCEL_STATUS = {"interrupted": 409, "the client disconnected": 499, "the server is shutting down": 503}


def create_app(models: ModelPool, settings: ServeSettings) -> FastAPI:
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start(asyncio.get_running_loop())
        state["ready"] = True
        yield
        state["ready"] = False
        await asyncio.to_thread(worker.stop, settings.shutdown_grace_s)
        logging.getLogger("sdfast.serve").warning("sdfast serve: stopped")

    # A1111 takes JSON without a Content-Type header (requests.post(data=json.dumps(...))), so FastAPI must too
    app = FastAPI(title="sdfast", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, strict_content_type=False)
    worker = Worker(settings.max_queue)
    metrics = Metrics(worker.stats, models)
    worker.observe_stage, models.on_event = metrics.observe_stage, metrics.observe_model_event
    app.state.worker, app.state.metrics, app.state.progress = worker, metrics, ProgressView(worker)
    ctx = ServeContext(models, worker, metrics, settings, app.state.progress)

    # -- errors: 4xx naming the field --------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the body is not valid JSON", "body", path=request.url.path)
        field = ".".join(location) or "body"
        cause = first.get("ctx", {}).get("error")  # a validator's own exception: its text, without Pydantic's "Value error, "
        message = str(cause) if isinstance(cause, Exception) else first.get("msg", "invalid")
        return error_response(422, f"{field}: {message}", field, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None), path=request.url.path)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, error: FieldError):
        message = f"{error.field}: {error.message}" if error.field else error.message
        return error_response(error.status, message, error.field, path=request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return error_response(500, f"internal error: {type(error).__name__}", path=request.url.path)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull):
        return error_response(429, f"the queue is full ({settings.max_queue} waiting); retry later",
                              headers={"Retry-After": str(error.retry_after_s)}, path=request.url.path)

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, error: Cancelled):
        status = CANCEL_STATUS.get(error.reason, 504 if error.reason.startswith("timed out") else 409)
        headers = {"x-should-retry": "false"} if error.reason == "interrupted" else None  # the openai client retries a 409 otherwise
        return error_response(status, f"the job was stopped: {error.reason}", headers=headers, path=request.url.path)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError):
        return error_response(500, f"engine error: {error}", path=request.url.path)

    @app.exception_handler(SdfastError)
    async def sdfast_error(request: Request, error: SdfastError):
        return error_response(422, str(error), path=request.url.path)

    # -- probes and metrics --------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state["ready"] or not worker.alive:
            return error_response(503, "not ready" if state["ready"] else "starting or stopping")
        entry = models.entries[models.current]
        geometry = entry.manifest.geometry
        return {"ready": True, "model": entry.name, "backend": models.backend, "size": f"{geometry['width']}x{geometry['height']}",
                "sizes": entry.manifest.sizes_text.split(", "), "batch": int(geometry["batch"]),
                "models": {e.name: {"loaded": e.pipeline is not None, "weights_bytes": e.weights_bytes} for e in models.entries.values()}}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.exposition(), media_type="text/plain; version=0.0.4")

    app.include_router(a1111_router(ctx))
    app.include_router(controlnet_router(ctx))
    app.include_router(openai_router(ctx))
    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def wrap(app: FastAPI, settings: ServeSettings):
    """The ASGI callable uvicorn runs: the app behind auth, logs and metrics, behind the body-size limit."""
    return BodyLimit(Edge(app, settings, app.state.metrics), settings.max_body_bytes)
