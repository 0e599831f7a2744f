"""What the routes of both APIs share: the settings, the models, the worker, and the one way to run a generation."""
from __future__ import annotations

import asyncio
import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

from fastapi import Request

from sdfast.errors import RequestError
from sdfast.runtime.pipeline import GenerationRequest, GenerationResult, Pipeline
from sdfast.serve.metrics import Metrics
from sdfast.serve.models import ModelEntry, ModelPool
from sdfast.serve.progress import ProgressView
from sdfast.serve.schemas import MAX_BODY_BYTES, FieldError
from sdfast.serve.worker import Cancelled, Worker


# Set per request by a Ray Serve replica (serve/ray_app.py) to what its ingress holds: the current model (A1111's
# sd_model_checkpoint) and the A1111 options, for which a single server has its own ``models.current`` and options.
REQUEST_MODEL: ContextVar[str | None] = ContextVar("sdfast_request_model", default=None)
REQUEST_OPTIONS: ContextVar[dict | None] = ContextVar("sdfast_request_options", default=None)


@dataclass
class ServeSettings:
    max_queue: int = 16
    api_key: str | None = None
    request_timeout_s: float = 300.0
    url_ttl_s: float = 600.0  # how long an OpenAI response_format=url image is served
    max_body_bytes: int = MAX_BODY_BYTES
    shutdown_grace_s: float = 30.0


@dataclass
class ServeContext:
    models: ModelPool
    worker: Worker
    metrics: Metrics
    settings: ServeSettings
    progress: ProgressView
    server_options: dict = field(default_factory=lambda: {"CLIP_stop_at_last_layers": 1})  # A1111's /sdapi/v1/options that sdfast honours

    @property
    def options(self) -> dict:
        """The A1111 options in force for this request: the server's, or on Ray Serve the ingress's."""
        passed = REQUEST_OPTIONS.get()
        return self.server_options if passed is None else passed

    def current(self) -> ModelEntry:
        """The model of requests that name none: the server's current one, or on Ray Serve the ingress's."""
        return self.models.entry(REQUEST_MODEL.get() or self.models.current, "sd_model_checkpoint")

    def entry(self, requested: str | None, field: str) -> ModelEntry:
        """The model a request names in ``field``, or the current one when it names none (a FieldError if unknown)."""
        return self.models.entry(requested, field) if requested not in (None, "") else self.current()

    async def model(self, requested: str | None, field: str) -> tuple[ModelEntry, Pipeline]:
        """The model a request names in ``field`` (the current one when None) and its pipeline, loaded if it was not."""
        entry = self.entry(requested, field)
        async with self.using(entry) as (pipeline, _):
            return entry, pipeline

    @contextlib.asynccontextmanager
    async def using(self, entry: ModelEntry):
        """``(pipeline, hold)``: ``entry``'s model, loaded within the request timeout (else a 504), and held for the
        block and for the jobs given to ``hold``: another model's load cannot unload it meanwhile."""
        timeout = self.settings.request_timeout_s
        try:
            async with self.models.use(entry.name, timeout) as held:
                yield held
        except asyncio.TimeoutError:
            raise Cancelled(f"timed out after {timeout:g} s waiting for model '{entry.name}' to load") from None

    async def run(self, pipeline: Pipeline, hold, generation: GenerationRequest, request: Request) -> list[GenerationResult]:
        """Check ``generation`` against ``pipeline`` (a FieldError before queuing), queue it, wait for its images;
        ``hold`` (from ``using``) keeps the model loaded while the engine thread runs the job."""
        try:
            # every field the engine checks, refused before queuing; off the event loop (a first LoRA is read and parsed)
            await asyncio.to_thread(pipeline.validate, generation)
        except RequestError as error:
            raise FieldError(_field_of(str(error)), str(error)) from None
        results = await self.worker.submit(pipeline, generation, len(generation.seeds), self.settings.request_timeout_s,
                                           request.is_disconnected, track=hold)
        self.metrics.images.inc(len(results))
        return results


def _field_of(message: str) -> str | None:
    """The request field a pipeline RequestError is about, from its wording."""
    for field_name, words in (("hr_sampler_name", "hires pass: "), ("hr_upscaler", "hires upscaler"), ("hr_scale", "hires fix to"), ("hr_scale", "hires scale"),
                              ("hr_resize_x", "hires resize"), ("denoising_strength", "hires denoising"),
                              ("hr_second_pass_steps", "hires steps"), ("enable_hr", "hires fix"),
                              ("alwayson_scripts.controlnet", "controlnet"), ("denoising_strength", "strength"), ("sampler_name", "part-way"), ("steps", "steps"), ("cfg_scale", "cfg scale"),
                              ("batch_size", "batch size"), ("n_iter", "n_iter"), ("seed", "seed"), ("sampler_name", "sampler"),
                              ("negative_prompt", "negative prompt"), ("prompt", "prompt"), ("eta", "eta"), ("override_settings.CLIP_stop_at_last_layers", "clip skip"),
                              ("init_images", "init image"), ("mask", "mask"), ("width", "serves"),
                              ("prompt", "lora")):  # A1111 requests name LoRAs in the prompt (<lora:name:weight>)
        if words in message.lower():
            return field_name
    return None
