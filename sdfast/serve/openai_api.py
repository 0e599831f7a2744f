"""OpenAI's images and models API (/v1/images, /v1/models) over the server's models, with OpenAI's error shape."""
from __future__ import annotations

import asyncio
import base64
import secrets
import threading
import time
from collections import OrderedDict
from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sdfast.errors import RequestError
from sdfast.runtime.images import png_bytes
from sdfast.runtime.pipeline import GenerationRequest
from sdfast.serve.context import ServeContext
from sdfast.serve.edge import error_response
from sdfast.serve.schemas import DEFAULT_CFG_SCALE, SEED_LIMIT, FieldError, OpenAIImageRequest
from sdfast.serve.worker import Cancelled


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


# what OpenAI's clients send as "model" when they name none of this server's: the current model, as A1111's requests get
GENERIC_MODELS = ("sdfast", "dall-e-2", "dall-e-3", "gpt-image-1")


def requested_model(model: str | None, models) -> str | None:
    """The model an OpenAI request names, or None for the current one: OpenAI's own names mean the current model,
    unless the server serves a model of that name."""
    return model if model and (model not in GENERIC_MODELS or models.find(model)) else None


def openai_router(ctx: ServeContext) -> APIRouter:
    router, models, images = APIRouter(), ctx.models, ImageStore(ctx.settings.url_ttl_s)

    @router.post("/v1/images/generations")
    async def openai_generations(body: OpenAIImageRequest, request: Request):
        entry = ctx.entry(requested_model(body.model, models), "model")
        async with ctx.using(entry) as (pipeline, hold):
            width, height = pipeline.width, pipeline.height
            if body.size not in (None, "auto"):
                try:
                    width, height = (int(v) for v in body.size.lower().split("x"))
                except ValueError:
                    raise FieldError("size", f"'{body.size}' is not WIDTHxHEIGHT") from None
                try:
                    pipeline.at_size(width, height)
                except RequestError as error:
                    raise FieldError("size", str(error)) from None
            seed = secrets.randbelow(SEED_LIMIT - 1)
            batch = max(d for d in range(1, min(body.n, pipeline.batch_size) + 1) if body.n % d == 0)
            checker = pipeline.checker  # an engine without guidance (Turbo) samples as its model was distilled for
            generation = GenerationRequest(prompt=body.prompt, steps=checker.default_steps or 25,
                                           cfg_scale=DEFAULT_CFG_SCALE if pipeline.guidance else 1.0, seed=seed,
                                           sampler=checker.default_sampler or "dpmpp_2m_karras", width=width, height=height, batch_size=batch,
                                           n_iter=body.n // batch, clip_skip=ctx.options["CLIP_stop_at_last_layers"],
                                           seeds=[seed + i for i in range(body.n)])
            results = await ctx.run(pipeline, hold, generation, request)
            if len(results) < body.n or any(r.steps_run is not None for r in results):
                raise Cancelled("interrupted")  # OpenAI's API has no partial answer: A1111's interrupt is an error here
            data = []
            pngs = await asyncio.to_thread(lambda: [png_bytes(r.images[0], r.parameters[0]) for r in results])
            for png in pngs:
                if body.response_format == "url":
                    token = images.put(png)
                    data.append({"url": f"{str(request.base_url).rstrip('/')}/v1/images/files/{token}.png", "revised_prompt": body.prompt})
                else:
                    data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": body.prompt})
            return {"created": int(time.time()), "data": data}

    def model_object(entry) -> dict:
        """A served model as OpenAI's Model object; created is the engine's export time."""
        try:
            created = int(datetime.fromisoformat(entry.manifest.data["created"]).timestamp())
        except (KeyError, TypeError, ValueError):
            created = 0
        return {"id": entry.name, "object": "model", "created": created, "owned_by": "sdfast"}

    @router.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_object(entry) for entry in models.entries.values()]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        entry = models.entries.get(model_id)
        if entry is None:
            return error_response(404, f"The model '{model_id}' does not exist; this server serves {', '.join(models.entries)}",
                                  "model", path=request.url.path, code="model_not_found")
        return model_object(entry)

    @router.get("/v1/images/files/{name}")
    async def openai_file(name: str):
        data = images.get(name.removesuffix(".png"))
        if data is None:
            return error_response(404, "no such image (URLs expire after {:g} s)".format(ctx.settings.url_ttl_s))
        return Response(data, media_type="image/png")

    return router
