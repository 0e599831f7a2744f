"""The ASGI app: AUTOMATIC1111's /sdapi/v1 and OpenAI's /v1/images over one Worker, with auth, limits, logs and metrics."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from sdfast import __version__
from sdfast.errors import EngineError, RequestError, SdfastError
from sdfast.runtime.images import init_image_array, mask_array, png_bytes
from sdfast.runtime.pipeline import GenerationRequest, GenerationResult, Pipeline
from sdfast.sampling.registry import SAMPLERS, resolve_sampler
from sdfast.serve.metrics import Metrics
from sdfast.serve.schemas import (
    MAX_BODY_BYTES,
    SEED_LIMIT,
    FieldError,
    Img2ImgRequest,
    OpenAIImageRequest,
    Txt2ImgRequest,
    _Request,
    decode_image,
)
from sdfast.serve.worker import Cancelled, QueueFull, Worker

access_log = logging.getLogger("sdfast.access")
OPEN_PATHS = ("/health", "/ready")  # probes need no key
OPEN_PREFIXES = ("/v1/images/files/",)  # response_format=url images: their unguessable token is the credential
CANCEL_STATUS = {"interrupted": 409, "the client disconnected": 499, "the server is shutting down": 503}


@dataclass
class ServeSettings:
    max_queue: int = 16
    api_key: str | None = None
    request_timeout_s: float = 300.0
    url_ttl_s: float = 600.0  # how long an OpenAI response_format=url image is served
    max_body_bytes: int = MAX_BODY_BYTES
    shutdown_grace_s: float = 30.0


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None, path: str = "") -> JSONResponse:
    """A1111 routes: {"error", "field"}; OpenAI routes: OpenAI's {"error": {"message", "type", "param", "code"}}."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    else:
        body = {"error": message, **({"field": field} if field else {})}
    return JSONResponse(body, status_code=status, headers=headers)


class ImageStore:
    """PNGs served by URL for OpenAI's response_format=url: in memory, expiring, bounded."""

    def __init__(self, ttl_s: float, max_items: int = 256):
        self.ttl_s, self.max_items = ttl_s, max_items
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        token = secrets.token_urlsafe(18)
        with self._lock:
            self._expire()
            self._items[token] = (time.monotonic() + self.ttl_s, data)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(token)
            return item[1] if item else None

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, (expires, _) in self._items.items() if expires < now]:
            del self._items[token]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by Content-Length or while streaming (pure ASGI)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(413, f"request body over {self.limit >> 20} MiB", "body", path=scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        seen, started, refused = 0, False, False

        async def limited_receive():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # answer now; the app sees a client that went away and its replies are dropped
                refused = True
                if not started:
                    await too_large(scope, receive, tracking_send)
                return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def app_send(message):
            if not refused:
                await tracking_send(message)

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

        key = self.settings.api_key
        if key and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            scheme, _, supplied = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(supplied.strip().encode(), key.encode()):
                response = _error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authorization",
                                  headers={"WWW-Authenticate": "Bearer"}, path=path)
                await response(scope, receive, tracking_send)
                return self._account(scope, status[0], started)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001 - one line to the client, never a traceback
            if not responded[0]:
                await _error(500, f"internal error: {type(error).__name__}", path=path)(scope, receive, tracking_send)
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


def create_app(pipeline: Pipeline, settings: ServeSettings) -> FastAPI:
    state = {"ready": False, "options": {"CLIP_stop_at_last_layers": 1}}
    images = ImageStore(settings.url_ttl_s)

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
    worker = Worker(pipeline, settings.max_queue)
    metrics = Metrics(worker.stats)
    worker.observe_stage = metrics.observe_stage
    app.state.worker, app.state.metrics = worker, metrics

    # -- errors: 4xx naming the field --------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, "the body is not valid JSON", "body", path=request.url.path)
        field = ".".join(location) or "body"
        return _error(422, f"{field}: {first.get('msg', 'invalid')}", field, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), headers=getattr(error, "headers", None), path=request.url.path)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, error: FieldError):
        message = f"{error.field}: {error.message}" if error.field else error.message
        return _error(error.status, message, error.field, path=request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return _error(500, f"internal error: {type(error).__name__}", path=request.url.path)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull):
        return _error(429, f"the queue is full ({settings.max_queue} waiting); retry later", headers={"Retry-After": str(error.retry_after_s)},
                      path=request.url.path)

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, error: Cancelled):
        status = CANCEL_STATUS.get(error.reason, 504 if error.reason.startswith("timed out") else 409)
        return _error(status, f"the job was stopped: {error.reason}", path=request.url.path)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError):
        return _error(500, f"engine error: {error}", path=request.url.path)

    @app.exception_handler(SdfastError)
    async def sdfast_error(request: Request, error: SdfastError):
        return _error(422, str(error), path=request.url.path)

    # -- probes and metrics --------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state["ready"] or not worker.alive:
            return _error(503, "not ready" if state["ready"] else "starting or stopping")
        return {"ready": True, "model": pipeline.manifest.model_name, "backend": pipeline.backend,
                "size": f"{pipeline.width}x{pipeline.height}", "batch": pipeline.batch_size}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.exposition(), media_type="text/plain; version=0.0.4")

    # -- AUTOMATIC1111 ------------------------------------------------------------------------------------------

    def model_title() -> str:
        return f"{pipeline.manifest.model_name} [{pipeline.manifest.model_hash}]"

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": spec.a1111_name, "aliases": [spec.key] + ([spec.diffusers_class] if spec.diffusers_class else []), "options": {}}
                for spec in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": model_title(), "model_name": pipeline.manifest.model_name, "hash": pipeline.manifest.model_hash,
                 "sha256": pipeline.manifest.data["source"].get("fingerprint"), "filename": pipeline.manifest.root.name, "config": None}]

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": model_title(), "CLIP_stop_at_last_layers": state["options"]["CLIP_stop_at_last_layers"],
                "samples_format": "png", "sd_checkpoint_hash": pipeline.manifest.data["source"].get("fingerprint")}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise FieldError("body", "is not valid JSON", status=400) from None
        if not isinstance(body, dict):
            raise FieldError("body", "must be a JSON object of option names and values")
        checkpoint = body.get("sd_model_checkpoint")
        if checkpoint is not None and checkpoint not in (model_title(), pipeline.manifest.model_name):
            raise FieldError("sd_model_checkpoint", f"this server holds one model, '{model_title()}'")
        if "CLIP_stop_at_last_layers" in body:
            value = body["CLIP_stop_at_last_layers"]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= int(pipeline.manifest.model["text_layers"]):
                raise FieldError("CLIP_stop_at_last_layers", f"must be an integer from 1 to {pipeline.manifest.model['text_layers']}")
            state["options"]["CLIP_stop_at_last_layers"] = value
        return True

    @app.get("/sdapi/v1/progress")
    async def progress():
        stats = worker.stats
        job = stats.current
        fraction = job.step / job.total_steps if job and job.total_steps else 0.0
        elapsed = time.monotonic() - stats.current_started if job else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {"progress": fraction, "eta_relative": eta, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": bool(job and job.cancelled), "job": f"job {job.id}" if job else "",
                          "job_count": stats.queued + (1 if job else 0), "job_timestamp": "0", "job_no": 0,
                          "sampling_step": job.step if job else 0, "sampling_steps": job.total_steps if job else 0}}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        generation = _generation(body)
        results = await _run(generation, request)
        return await asyncio.to_thread(_a1111_response, body, generation, results)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, request: Request):
        if not body.init_images:
            raise FieldError("init_images", "img2img needs one init image (base64)")
        init, mask = await asyncio.to_thread(_images, body)  # decoding and resizing stay off the event loop
        generation = _generation(body, init, mask, body.denoising_strength)
        results = await _run(generation, request)
        return await asyncio.to_thread(_a1111_response, body, generation, results)

    def _images(body: Img2ImgRequest):
        warnings: list[str] = []
        try:
            init = init_image_array(decode_image("init_images", body.init_images[0]), pipeline.width, pipeline.height, warnings)
        except RequestError as error:
            raise FieldError("init_images", str(error)) from None
        mask = None
        if body.mask:
            try:
                mask = mask_array(decode_image("mask", body.mask), pipeline.width, pipeline.height, warnings)
            except RequestError as error:
                raise FieldError("mask", str(error)) from None
            mask = 1.0 - mask if body.inpainting_mask_invert else mask
        return init, mask

    def _generation(body: _Request, init=None, mask=None, strength: float | None = None) -> GenerationRequest:
        problem = body.unsupported()
        if problem:
            raise problem
        for name, value, engine_value in (("width", body.width, pipeline.width), ("height", body.height, pipeline.height)):
            if value != engine_value:
                raise FieldError(name, f"{value}: this engine serves {pipeline.width}x{pipeline.height} only (export another size)")
        sampler = _sampler(body)
        eta = body.eta
        if eta is not None and not sampler.takes_eta:
            if eta not in (0.0, 1.0):  # 1.0 is A1111's ancestral default, which webuiapi always sends
                raise FieldError("eta", f"eta applies to DDIM only, not to {sampler.a1111_name}")
            eta = None
        clip_skip = body.clip_skip() if "CLIP_stop_at_last_layers" in body.override_settings else state["options"]["CLIP_stop_at_last_layers"]
        seed = body.seed if body.seed >= 0 else secrets.randbelow(SEED_LIMIT - 1)
        total = body.batch_size * body.n_iter
        batch = max(d for d in range(1, min(total, pipeline.batch_size) + 1) if total % d == 0)
        return GenerationRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, cfg_scale=body.cfg_scale, seed=seed,
            sampler=sampler.key, height=body.height, width=body.width, batch_size=batch, n_iter=total // batch, clip_skip=clip_skip,
            init_image=init, mask=mask, strength=strength if init is not None else None, eta=eta or 0.0,
            seeds=[seed + i for i in range(total)],
        )

    def _sampler(body: _Request):
        name = body.sampler_name or body.sampler_index or "Euler a"
        scheduler = (body.scheduler or "automatic").strip().lower()
        if scheduler not in ("automatic", "karras"):
            raise FieldError("scheduler", f"'{body.scheduler}' is not supported: use automatic, or karras")
        try:
            spec = resolve_sampler(name)
        except RequestError as error:
            raise FieldError("sampler_name", str(error)) from None
        if scheduler == "karras" and "karras" not in spec.key:
            try:
                spec = resolve_sampler(f"{spec.a1111_name} Karras")
            except RequestError:
                raise FieldError("scheduler", f"{spec.a1111_name} has no Karras form; use scheduler automatic") from None
        return spec

    async def _run(generation: GenerationRequest, request: Request) -> list[GenerationResult]:
        try:
            pipeline.validate(generation)  # every field the engine checks, refused before queuing
        except RequestError as error:
            raise FieldError(_field_of(str(error)), str(error)) from None
        results = await worker.submit(generation, len(generation.seeds), settings.request_timeout_s, request.is_disconnected)
        metrics.images.inc(len(results))
        return results

    def _a1111_response(body: _Request, generation: GenerationRequest, results: list[GenerationResult]) -> dict:
        encoded = [base64.b64encode(png_bytes(r.images[0], r.parameters[0])).decode() for r in results]
        seeds = [r.seeds[0] for r in results]
        infotexts = [r.parameters[0] for r in results]
        spec = resolve_sampler(generation.sampler)
        info = {
            "prompt": generation.prompt, "all_prompts": [generation.prompt] * len(results),
            "negative_prompt": generation.negative_prompt, "all_negative_prompts": [generation.negative_prompt] * len(results),
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(results), "subseed_strength": 0,
            "width": generation.width, "height": generation.height, "sampler_name": spec.a1111_name, "cfg_scale": generation.cfg_scale,
            "steps": generation.steps, "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": pipeline.manifest.model_name, "sd_model_hash": pipeline.manifest.model_hash, "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": generation.strength,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": generation.clip_skip,
            "is_using_inpainting_conditioning": bool(pipeline.inpainting_unet and generation.mask is not None),
            "version": f"sdfast {__version__}",
        }
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}

    # -- OpenAI -----------------------------------------------------------------------------------------------

    @app.post("/v1/images/generations")
    async def openai_generations(body: OpenAIImageRequest, request: Request):
        width, height = pipeline.width, pipeline.height
        if body.size not in (None, "auto"):
            try:
                width, height = (int(v) for v in body.size.lower().split("x"))
            except ValueError:
                raise FieldError("size", f"'{body.size}' is not WIDTHxHEIGHT") from None
            if (width, height) != (pipeline.width, pipeline.height):
                raise FieldError("size", f"{body.size}: this engine serves {pipeline.width}x{pipeline.height} only")
        seed = secrets.randbelow(SEED_LIMIT - 1)
        batch = max(d for d in range(1, min(body.n, pipeline.batch_size) + 1) if body.n % d == 0)
        generation = GenerationRequest(prompt=body.prompt, steps=25, cfg_scale=7.0 if pipeline.guidance else 1.0, seed=seed,
                                       sampler="dpmpp_2m_karras", width=width, height=height, batch_size=batch,
                                       n_iter=body.n // batch, clip_skip=state["options"]["CLIP_stop_at_last_layers"],
                                       seeds=[seed + i for i in range(body.n)])
        results = await _run(generation, request)
        data = []
        pngs = await asyncio.to_thread(lambda: [png_bytes(r.images[0], r.parameters[0]) for r in results])
        for png in pngs:
            if body.response_format == "url":
                token = images.put(png)
                data.append({"url": f"{str(request.base_url).rstrip('/')}/v1/images/files/{token}.png", "revised_prompt": body.prompt})
            else:
                data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": body.prompt})
        return {"created": int(time.time()), "data": data}

    @app.get("/v1/images/files/{name}")
    async def openai_file(name: str):
        data = images.get(name.removesuffix(".png"))
        if data is None:
            return _error(404, "no such image (URLs expire after {:g} s)".format(settings.url_ttl_s))
        return Response(data, media_type="image/png")

    return app


def _field_of(message: str) -> str | None:
    """The request field a pipeline RequestError is about, from its wording."""
    for field, words in (("denoising_strength", "strength"), ("sampler_name", "part-way"), ("steps", "steps"), ("cfg_scale", "cfg scale"), ("batch_size", "batch size"), ("n_iter", "n_iter"),
                         ("seed", "seed"), ("sampler_name", "sampler"), ("prompt", "prompt"), ("eta", "eta"),
                         ("override_settings.CLIP_stop_at_last_layers", "clip skip"),
                         ("init_images", "init image"), ("mask", "mask"), ("width", "built for")):
        if words in message.lower():
            return field
    return None


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
