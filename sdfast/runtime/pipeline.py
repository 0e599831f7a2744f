"""Text-to-image over an engine dir: tokenize, encode, run the sampler loop on the U-Net engine, decode."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sdfast import __version__
from sdfast.errors import EngineError, RequestError
from sdfast.runtime.backends import Engine, get_backend
from sdfast.runtime.images import infotext, to_uint8
from sdfast.runtime.manifest import Manifest, read_manifest
from sdfast.runtime.tokenizer import PromptTokenizer
from sdfast.sampling.denoiser import Denoiser
from sdfast.sampling.noise import TorchCompatibleGenerator
from sdfast.sampling.registry import check_supported, resolve_sampler
from sdfast.sampling.schedules import NoiseSchedule

MAX_STEPS = 1000
StepCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    cfg_scale: float = 7.5
    seed: int = 0
    sampler: str = "euler"
    height: int | None = None  # None: the engine's size
    width: int | None = None
    batch_size: int | None = None  # None: the engine's batch


@dataclass
class StageTimings:
    """Wall seconds per stage of one generation."""

    text_encoder: float = 0.0
    unet_steps: list[float] = field(default_factory=list)
    vae_decode: float = 0.0
    total: float = 0.0

    def summary(self) -> dict[str, float]:
        steps = sorted(self.unet_steps)
        return {
            "text_encoder_ms": self.text_encoder * 1e3,
            "unet_step_median_ms": float(np.median(steps)) * 1e3 if steps else 0.0,
            "unet_step_min_ms": steps[0] * 1e3 if steps else 0.0,
            "unet_step_max_ms": steps[-1] * 1e3 if steps else 0.0,
            "unet_total_ms": sum(steps) * 1e3,
            "vae_decode_ms": self.vae_decode * 1e3,
            "total_ms": self.total * 1e3,
        }


@dataclass
class GenerationResult:
    images: np.ndarray  # [B, H, W, 3] uint8
    seeds: list[int]
    parameters: list[str]  # A1111 infotext per image
    latents: np.ndarray  # [B, 4, H/8, W/8] final latents, before the VAE scaling
    timings: StageTimings
    warnings: list[str]


def _finite_or_raise(stage: str, value: np.ndarray) -> np.ndarray:
    if not np.isfinite(value).all():
        raise EngineError(f"{stage} produced NaN or inf; the image would be black (an fp16 overflow, or corrupt weights)")
    return value


class Pipeline:
    """A loaded engine dir. Thread-compatible, not thread-safe: serialize calls to ``generate``."""

    def __init__(self, manifest: Manifest, engines: dict[str, Engine], tokenizer: PromptTokenizer, scheduler_config: dict, backend: str):
        self.manifest = manifest
        self.engines = engines
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.schedule = NoiseSchedule.from_config(scheduler_config)
        self.backend = backend
        geometry = manifest.geometry
        self.height, self.width = int(geometry["height"]), int(geometry["width"])
        self.batch_size = int(geometry["batch"])
        self.guidance = bool(geometry["guidance"])
        self.latent_shape = (int(geometry["latent_channels"]), int(geometry["latent_height"]), int(geometry["latent_width"]))

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "cpu", verify: str = "full") -> "Pipeline":
        """Read and check the manifest and files, then create the engines. ``verify``: 'full' (sha256) or 'size'."""
        try:
            return cls._load(engine_dir, backend, verify)
        except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as error:
            raise EngineError(f"engine dir {engine_dir}: unusable ({type(error).__name__}: {error})") from None

    @classmethod
    def _load(cls, engine_dir: str | Path, backend: str, verify: str) -> "Pipeline":
        if verify not in ("full", "size"):
            raise RequestError(f"verify must be 'full' or 'size', not '{verify}'")
        manifest = read_manifest(engine_dir)
        manifest.verify_files(full=verify == "full")
        runtime_backend = get_backend(backend)
        needed = ("text_encoder", "unet", "vae_decoder")
        engines = {}
        for name in needed:
            if name not in manifest.components:
                raise EngineError(f"engine dir {manifest.root} has no {name}")
            engines[name] = runtime_backend.load(manifest.components[name], manifest.path(manifest.components[name].file))
        tok = manifest.tokenizer
        tokenizer = PromptTokenizer(manifest.path(tok["file"]), tok["bos_id"], tok["eos_id"], tok["pad_id"], tok["max_length"])
        scheduler_path = manifest.path(manifest.data["scheduler"]["file"])
        try:
            scheduler_config = json.loads(scheduler_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise EngineError(f"cannot read {scheduler_path}: {error}") from None
        check_supported(scheduler_config)
        return cls(manifest, engines, tokenizer, scheduler_config, backend)

    # -- request checks -------------------------------------------------------------------------------

    def _check(self, request: GenerationRequest) -> int:
        height = request.height if request.height is not None else self.height
        width = request.width if request.width is not None else self.width
        batch = request.batch_size if request.batch_size is not None else self.batch_size
        if (height, width, batch) != (self.height, self.width, self.batch_size):
            raise RequestError(
                f"this engine was built for {self.width}x{self.height} (width x height), batch {self.batch_size}; "
                f"the request asks for {width}x{height}, batch {batch} (re-export with --width/--height/--batch)"
            )
        for label, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
            if not isinstance(text, str):
                raise RequestError(f"{label} must be text")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(f"{label} is not valid UTF-8 text") from None
        if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
            raise RequestError(f"steps must be an integer from 1 to {MAX_STEPS}, not {request.steps}")
        if not math.isfinite(request.cfg_scale) or request.cfg_scale < 0:
            raise RequestError(f"cfg scale must be a finite number >= 0, not {request.cfg_scale}")
        if request.cfg_scale > 1 and not self.guidance:
            raise RequestError("this engine was exported without classifier-free guidance (--no-guidance): use cfg scale 1")
        if not isinstance(request.seed, int) or request.seed < 0:
            raise RequestError(f"seed must be an integer >= 0, not {request.seed}")
        return batch

    # -- stages ---------------------------------------------------------------------------------------

    def _encode_text(self, request: GenerationRequest, batch: int, use_cfg: bool, warnings: list[str]) -> np.ndarray:
        positive = self.tokenizer.encode(request.prompt)
        if positive.dropped_tokens:
            warnings.append(
                f"prompt is longer than {self.tokenizer.max_length - 2} tokens: the last {positive.dropped_tokens} "
                "token(s) were dropped"
            )
        negative = self.tokenizer.encode(request.negative_prompt)
        if negative.dropped_tokens:
            warnings.append(f"negative prompt: the last {negative.dropped_tokens} token(s) were dropped")
        if self.guidance:
            # Unconditional rows first, as diffusers concatenates them; with cfg <= 1 both halves are conditional.
            first_half = negative.ids if use_cfg else positive.ids
            rows = [first_half] * batch + [positive.ids] * batch
        else:
            rows = [positive.ids] * batch
        input_ids = np.stack(rows)  # input_ids: [unet_batch, 77]
        (hidden,) = self.engines["text_encoder"].run({"input_ids": input_ids})
        return _finite_or_raise("text encoder", hidden)  # hidden: [unet_batch, 77, D]

    def _unet_function(self, hidden: np.ndarray, cfg_scale: float, use_cfg: bool, timings: StageTimings):
        engine = self.engines["unet"]
        unet_batch = hidden.shape[0]

        def predict(x_in: np.ndarray, timestep: float) -> np.ndarray:
            # x_in: [B, 4, h, w], already scaled by c_in
            sample = np.concatenate([x_in, x_in]) if self.guidance else x_in  # sample: [unet_batch, 4, h, w]
            timesteps = np.full((unet_batch,), timestep, dtype=np.float32)
            started = time.perf_counter()
            (output,) = engine.run({"sample": sample, "timestep": timesteps, "encoder_hidden_states": hidden})
            timings.unet_steps.append(time.perf_counter() - started)
            _finite_or_raise("U-Net", output)
            if not self.guidance:
                return output
            uncond, cond = np.split(output, 2)
            return uncond + np.float32(cfg_scale) * (cond - uncond) if use_cfg else cond

        return predict

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VP latents [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1]."""
        scaled = latents / np.float32(self.manifest.model["vae_scaling_factor"])
        (images,) = self.engines["vae_decoder"].run({"latent": scaled})
        return _finite_or_raise("VAE decoder", images)

    # -- the whole thing ------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> GenerationResult:
        batch = self._check(request)
        spec = resolve_sampler(request.sampler)
        plan = spec.plan(self.scheduler_config, self.schedule, request.steps)  # refuses what it cannot do, before any work
        started = time.perf_counter()
        timings, warnings = StageTimings(), []
        use_cfg = self.guidance and request.cfg_scale > 1  # as diffusers: guidance only above 1

        stage = time.perf_counter()
        hidden = self._encode_text(request, batch, use_cfg, warnings)
        timings.text_encoder = time.perf_counter() - stage

        seeds = [request.seed + i for i in range(batch)]
        # Image i's initial noise is torch.randn with seed + i: equal to diffusers for batch 1, and to A1111's per-image seeds.
        generators = [TorchCompatibleGenerator(seed) for seed in seeds]
        noise = np.concatenate([g.randn((1, *self.latent_shape)) for g in generators])  # noise: [B, 4, h, w]

        def step_noise(shape: tuple[int, ...]) -> np.ndarray:
            return np.concatenate([g.randn((1, *shape[1:])) for g in generators])

        denoiser = Denoiser(
            self._unet_function(hidden, request.cfg_scale, use_cfg, timings),
            self.manifest.model["prediction_type"],
            lambda sigma: plan.timestep_for(sigma, self.schedule),
        )
        callback = (lambda i, _x: on_step(i + 1, plan.steps)) if on_step else None
        x = noise * np.float32(plan.initial_noise_scale)
        x = spec.run(denoiser, x, plan, callback, scheduler_config=spec.config_for(self.scheduler_config), noise=step_noise)
        latents = x * np.float32(plan.final_scale)  # latents: [B, 4, h, w], VP form

        stage = time.perf_counter()
        images = to_uint8(self.decode(latents))
        timings.vae_decode = time.perf_counter() - stage
        timings.total = time.perf_counter() - started

        parameters = [self._infotext(request, spec.a1111_name, seed) for seed in seeds]
        return GenerationResult(images, seeds, parameters, latents, timings, warnings)

    def _infotext(self, request: GenerationRequest, sampler_name: str, seed: int) -> str:
        return infotext(
            request.prompt,
            request.negative_prompt,
            {
                "Steps": request.steps,
                "Sampler": sampler_name,
                "CFG scale": request.cfg_scale,
                "Seed": seed,
                "Size": f"{self.width}x{self.height}",
                "Model hash": self.manifest.model_hash,
                "Model": self.manifest.model_name,
                "Version": f"sdfast {__version__}",
            },
        )
