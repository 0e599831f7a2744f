"""A generation request checked against an engine dir's manifest alone: every refusal comes before any engine loads."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdfast.errors import EngineError, RequestError
from sdfast.runtime.families import family_class
from sdfast.runtime.manifest import Manifest, read_manifest
from sdfast.runtime.guidance_truncation import check_request as check_guidance_stop
from sdfast.runtime.int8_unet import check_request as check_int8
from sdfast.runtime.prompts import parse_prompt_attention
from sdfast.runtime.step_cache import check_request as check_step_cache
from sdfast.sampling.registry import check_supported, is_flow, resolve_sampler, schedule_for
from sdfast.sampling.schedules import SamplingPlan

if TYPE_CHECKING:
    from sdfast.runtime.generation import GenerationRequest

TINY_VAE = "vae_decoder_tiny"  # the engine dir's optional tiny VAE decoder (TAESD)
VAE_DECODERS = ("full", "tiny")

MAX_STEPS = 1000  # the one step limit (CLI, Python API, HTTP): the training schedule's 1000 timesteps, past which diffusers refuses
MAX_ITERATIONS = 10000
DEFAULT_STRENGTH = 0.75  # A1111's img2img denoising strength
MAX_CONTROL_UNITS = 8  # ControlNet units per request (A1111's default UI shows 3)


@dataclass(frozen=True)
class PreparedRequest:
    """What a checked request runs: images per U-Net call, the sampler, its plan from the first step that runs."""

    batch: int
    spec: object  # sampling.registry.SamplerSpec
    plan: SamplingPlan
    strength: float | None  # img2img denoising strength; None for txt2img


def read_scheduler_file(path: Path, error: type[Exception] = EngineError) -> dict:
    """A scheduler_config.json: ``error`` when it is unreadable, a ConfigError naming what sdfast cannot run in it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as problem:
        raise error(f"cannot read {path}: {problem}") from None
    if not isinstance(config, dict):
        raise error(f"{path}: not a scheduler config (a JSON object)")
    check_supported(config)  # a ConfigError naming what sdfast cannot run
    return config


def read_scheduler_config(manifest: Manifest) -> dict:
    """The engine dir's scheduler config, refused by name when sdfast cannot run it."""
    return read_scheduler_file(manifest.path(manifest.data["scheduler"]["file"]))


DISTILLED_STEPS = 4  # SDXL Turbo's and Lightning's 1 to 4


def _scheduler_sampler(scheduler_config: dict) -> str:
    """The sampler of the folder's own scheduler class (diffusers' default), or Euler a where sdfast has none for it."""
    try:
        return resolve_sampler(scheduler_config.get("_class_name", ""), is_flow(scheduler_config)).key
    except RequestError:
        return "euler" if is_flow(scheduler_config) else "euler_a"


class RequestChecker:
    """The engine dir's fixed shapes, components and scheduler: enough to accept or refuse a request without its engines."""

    def __init__(self, manifest: Manifest, scheduler_config: dict):
        self.manifest = manifest
        self.backend = "cpu"  # the backend the requests run on (Pipeline sets it): some fast modes are the CPU's only
        self.scheduler_config = scheduler_config
        self.flow_model = is_flow(scheduler_config)  # a flow-matching model: its own samplers (sampling/flow.py)
        geometry = manifest.geometry
        patch = int(manifest.model.get("patch_size", 1))  # SD3's transformer sees 2x2 patches: dynamic shifting counts those
        self.schedule = schedule_for(scheduler_config, (int(geometry["latent_height"]) // patch) * (int(geometry["latent_width"]) // patch))
        self.height, self.width = int(geometry["height"]), int(geometry["width"])
        self.batch_size = int(geometry["batch"])
        self.sizes_text = manifest.sizes_text  # every size of the engine dir, for errors
        self.guidance = bool(geometry["guidance"])
        self.latent_shape = (int(geometry["latent_channels"]), int(geometry["latent_height"]), int(geometry["latent_width"]))
        self.text_layers = int(manifest.model["text_layers"])
        self.inpainting_unet = int(manifest.model["unet_in_channels"]) == 2 * self.latent_shape[0] + 1  # latents, mask, masked latents
        self.has_vae_encoder = "vae_encoder" in manifest.components
        # the family's guidance scale, or 1 (no guidance) on an engine exported without it
        self.default_cfg_scale = family_class(manifest.family).default_cfg_scale if self.guidance else 1.0
        # An engine without guidance serves a distilled model (Turbo, Lightning, LCM): a few steps of the sampler its
        # folder's scheduler names. With guidance, None: each interface keeps its own defaults (A1111's, the CLI's),
        # except on a flow model (SD3), where those (Euler a, DPM++ 2M Karras) do not apply: its scheduler's sampler.
        self.default_steps = None if self.guidance else DISTILLED_STEPS
        self.default_sampler = _scheduler_sampler(scheduler_config) if self.flow_model or not self.guidance else None

    @classmethod
    def for_engine_dir(cls, engine_dir: str | Path, width: int | None = None, height: int | None = None) -> "RequestChecker":
        """Read only the manifest and the scheduler config (milliseconds), not the engines; the checker of the engine
        dir's graphs at ``width`` x ``height`` (None: its default size), a RequestError listing its sizes if it lacks it."""
        manifest = read_manifest(engine_dir)
        manifest.verify_files(full=True, files=manifest.data["scheduler"]["files"])  # a few hundred bytes
        default_width, default_height = manifest.sizes[0]
        size = (default_width if width is None else width, default_height if height is None else height)
        if size not in manifest.sizes:
            raise RequestError(f"this engine dir serves {manifest.sizes_text} (width x height), not {size[0]}x{size[1]} "
                               "(export more sizes with sdfast export --size WxH)")
        manifest = manifest.at_size(*size)
        try:
            return cls(manifest, read_scheduler_config(manifest))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise EngineError(f"engine dir {engine_dir}: unusable ({type(error).__name__}: {error})") from None

    def prepare(self, request: "GenerationRequest") -> PreparedRequest:
        """The request's batch, sampler, plan and strength; RequestError for anything this engine cannot serve."""
        batch = self._check(request)
        spec = resolve_sampler(request.sampler, self.flow_model)
        plan = spec.plan(self.scheduler_config, self.schedule, request.steps)  # refuses what it cannot do, before any work
        strength = self.strength(request)
        if strength is not None:
            # diffusers' get_timesteps, as the family's pipeline rounds it: the last steps run, from the noised image
            start_step = (family_class(self.manifest.family).img2img_start_step(request.steps, strength) if request.start_step is None
                          else request.start_step)
            if not spec.starts_late and start_step > 0:
                raise RequestError(f"{spec.a1111_name} cannot start part-way through its schedule, as img2img and inpainting need; choose another sampler")
            if start_step >= plan.steps:
                raise RequestError(f"strength {strength} with {request.steps} steps leaves no step to run (steps x strength must be >= 1)")
            plan = plan.starting_at(start_step)
        return PreparedRequest(batch, spec, plan, strength)

    def strength(self, request: "GenerationRequest") -> float | None:
        if request.init_image is None and request.init_latents is None:
            return None
        if request.strength is not None:
            return float(request.strength)
        return 1.0 if self.inpainting_unet else DEFAULT_STRENGTH

    def _check(self, request: "GenerationRequest") -> int:
        height = request.height if request.height is not None else self.height
        width = request.width if request.width is not None else self.width
        if (height, width) != (self.height, self.width):
            raise RequestError(
                f"this engine dir serves {self.sizes_text} (width x height), not {width}x{height} "
                "(export more sizes with sdfast export --size WxH)"
            )
        batch = request.batch_size if request.batch_size is not None else self.batch_size
        if not isinstance(batch, int) or not 1 <= batch <= self.batch_size:
            raise RequestError(f"batch size must be from 1 to the engine's batch {self.batch_size}, not {batch} (re-export with --batch)")
        if not isinstance(request.n_iter, int) or not 1 <= request.n_iter <= MAX_ITERATIONS:
            raise RequestError(f"n_iter must be an integer from 1 to {MAX_ITERATIONS}, not {request.n_iter}")
        for label, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
            if not isinstance(text, str):
                raise RequestError(f"{label} must be text")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(f"{label} is not valid UTF-8 text") from None
            try:
                parse_prompt_attention(text)  # emphasis syntax and weights: refused here, not after the engines load
            except RequestError as error:
                raise RequestError(f"{label}: {error}") from None
        if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
            raise RequestError(f"steps must be an integer from 1 to {MAX_STEPS}, not {request.steps}")
        if not isinstance(request.cfg_scale, (int, float)) or not math.isfinite(request.cfg_scale) or request.cfg_scale < 0:
            raise RequestError(f"cfg scale must be a finite number >= 0, not {request.cfg_scale}")
        if request.cfg_scale > 1 and not self.guidance:
            raise RequestError("this engine was exported without classifier-free guidance (--no-guidance): use cfg scale 1")
        if not isinstance(request.seed, int) or request.seed < 0:
            raise RequestError(f"seed must be an integer >= 0, not {request.seed}")
        if request.seeds is not None and (len(request.seeds) != batch * request.n_iter
                                          or not all(isinstance(s, int) and s >= 0 for s in request.seeds)):
            raise RequestError(f"seeds must be {batch * request.n_iter} integers >= 0, one per image")
        if not isinstance(request.eta, (int, float)) or not 0.0 <= request.eta <= 1.0:
            raise RequestError(f"eta must be from 0.0 to 1.0, not {request.eta}")
        sampler = resolve_sampler(request.sampler, self.flow_model)
        if request.eta and not sampler.takes_eta:
            raise RequestError(f"eta applies to DDIM only, not to {sampler.a1111_name}")
        if not isinstance(request.clip_skip, int) or not 1 <= request.clip_skip <= self.text_layers:
            raise RequestError(f"clip skip must be an integer from 1 to the text encoder's {self.text_layers} layers, not {request.clip_skip}")
        if request.hires is not None:
            from sdfast.runtime.hires import check_request

            check_request(request, width, height, self.manifest)
        self._check_images(request, batch)
        self._check_skip_layers(request)
        self._check_control(request)
        check_step_cache(request, self.manifest, sampler.evaluates_twice, self.backend)
        check_guidance_stop(request, self.manifest, sampler.evaluates_twice, self.backend)
        check_int8(request, self.manifest, self.backend)
        if request.guidance_stop is not None and not self.guidance:
            raise RequestError("guidance truncation needs an engine exported with classifier-free guidance")
        if request.vae_decoder not in VAE_DECODERS:
            raise RequestError(f"VAE decoder must be one of {', '.join(VAE_DECODERS)}, not {request.vae_decoder!r}")
        if request.vae_tiling and ("vae_decoder_tile" not in self.manifest.components or request.vae_decoder != "full"):
            raise RequestError("tiled VAE needs the engine dir's tile graphs (sdfast export --vae-tile PIXELS) and the full decoder"
                               if request.vae_decoder == "full" else "tiled VAE applies to the full VAE decoder, not the tiny one")
        if request.vae_tiling and request.init_image is not None and "vae_encoder_tile" not in self.manifest.components:
            raise RequestError("tiled VAE encode needs the engine dir's encoder tile graph (sdfast export --vae-tile with a VAE encoder)")
        if request.vae_decoder == "tiny" and TINY_VAE not in self.manifest.components:
            raise RequestError("this engine dir has no tiny VAE decoder: export it with sdfast export --vae-decoder DIR (taesd, taesdxl, taesd3)")
        return batch

    def _check_control(self, request: "GenerationRequest") -> None:
        from sdfast.runtime.control import is_residual
        from sdfast.runtime.controlnets import ControlNets

        units = request.control
        if not units:
            return
        if not isinstance(units, (tuple, list)):
            raise RequestError("control must be a list of ControlNet units")
        if len(units) > MAX_CONTROL_UNITS:
            raise RequestError(f"at most {MAX_CONTROL_UNITS} ControlNet units per request, not {len(units)}")
        denoiser = self.manifest.components[self.manifest.denoiser]
        if not any(is_residual(spec.name) for spec in denoiser.inputs):
            raise RequestError(f"this engine dir's {self.manifest.denoiser_label} takes no ControlNet residuals (exported with "
                               "--no-controlnet-inputs, before sdfast had ControlNet, or of a family without it): re-export it")
        if request.refiner_switch is not None:
            raise RequestError("ControlNet with a refiner is not supported: the refiner's U-Net has other residuals")
        for unit in units:
            unit.check(self.height, self.width)
        ControlNets(self.manifest).check(tuple(units))

    def _check_skip_layers(self, request: "GenerationRequest") -> None:
        slg = request.skip_layer_guidance
        if slg is None:
            return
        if self.manifest.family != "sd3":
            raise RequestError(f"skip-layer guidance applies to SD3 engines only, not to this {self.manifest.family} engine")
        if not self.guidance:
            raise RequestError("skip-layer guidance needs classifier-free guidance: this engine was exported without it")
        if request.init_image is not None:  # diffusers' SD3 img2img and inpaint pipelines have none either
            raise RequestError("skip-layer guidance applies to txt2img only, not with an init image")
        layers = int(self.manifest.components[self.manifest.denoiser].input("layer_keep").shape[0])
        if not slg.layers or any(not isinstance(layer, int) or not 0 <= layer < layers for layer in slg.layers):
            raise RequestError(f"skip-layer guidance layers must be block indices from 0 to {layers - 1}, not {list(slg.layers)}")
        if not isinstance(slg.scale, (int, float)) or not math.isfinite(slg.scale) or slg.scale < 0:
            raise RequestError(f"skip-layer guidance scale must be a finite number >= 0, not {slg.scale}")
        if not 0.0 <= slg.start < slg.stop <= 1.0:
            raise RequestError(f"skip-layer guidance start and stop must satisfy 0 <= start < stop <= 1, not {slg.start} and {slg.stop}")

    def _check_images(self, request: "GenerationRequest", batch: int) -> None:
        image_shape = (1, 3, self.height, self.width)
        if request.mask is not None and request.init_image is None:
            raise RequestError("a mask needs an init image to inpaint")
        if self.inpainting_unet and (request.init_image is None or request.mask is None):
            raise RequestError("this engine holds a 9-channel inpainting U-Net: it needs an init image and a mask")
        if request.init_image is not None:
            if not self.has_vae_encoder:
                raise RequestError("this engine dir has no VAE encoder, which img2img and inpainting need")
            # one image for every row, or (hires fix's image upscalers) one per image of the batch
            rows_ok = isinstance(request.init_image, np.ndarray) and request.init_image.shape[0] in (1, batch)
            if not rows_ok or request.init_image.shape[1:] != image_shape[1:] or (request.init_image.shape[0] > 1 and request.mask is not None):
                raise RequestError(f"init image must be a [1, 3, {self.height}, {self.width}] array (see images.load_init_image)")
        if request.init_latents is not None:
            if request.init_image is not None or request.mask is not None or self.inpainting_unet:
                raise RequestError("init latents replace the init image: not with an init image, a mask or an inpainting U-Net")
            if not isinstance(request.init_latents, np.ndarray) or request.init_latents.shape != (batch, *self.latent_shape):
                raise RequestError(f"init latents must be a [{batch}, {', '.join(map(str, self.latent_shape))}] array")
        if request.start_step is not None and (request.init_image is None and request.init_latents is None
                                               or not isinstance(request.start_step, int) or not 0 <= request.start_step < request.steps):
            raise RequestError(f"start step applies to img2img, from 0 to steps - 1, not {request.start_step}")
        if request.mask is not None and (not isinstance(request.mask, np.ndarray) or request.mask.shape != (1, 1, self.height, self.width)):
            raise RequestError(f"mask must be a [1, 1, {self.height}, {self.width}] array (see images.load_mask)")
        if request.strength is not None:
            if request.init_image is None and request.init_latents is None:
                raise RequestError("strength only applies with an init image")
            if not isinstance(request.strength, (int, float)) or not 0.0 <= request.strength <= 1.0:
                raise RequestError(f"strength must be from 0.0 to 1.0, not {request.strength}")
