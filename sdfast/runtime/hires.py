"""Hires fix as A1111 defines it (modules/processing.py, StableDiffusionProcessingTxt2Img): a first pass at the base
size, an upscale (of the latents, or of the decoded image), then img2img at the larger size from the same engine dir.

A1111's second pass runs ``hr_second_pass_steps`` (or the first pass's steps) from a schedule of
int(steps / denoising_strength) steps (sd_samplers_common.setup_img2img_steps), with fresh noise from each image's seed
at the larger latent shape. The latent upscalers are torch's interpolate (sdfast.runtime.resample), the image ones
Pillow's Lanczos and nearest; upscalers with model weights (ESRGAN and the like) are refused by name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from sdfast.errors import RequestError
from sdfast.runtime.resample import LATENT_MODES, resize_latents_a1111

if TYPE_CHECKING:
    from sdfast.runtime.generation import GenerationRequest, GenerationResult
    from sdfast.runtime.pipeline import Pipeline

IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")  # A1111's upscalers without weights (modules/upscaler.py)
UPSCALERS = (*LATENT_MODES, *IMAGE_UPSCALERS)
# what the names of A1111's model upscalers contain (ESRGAN_4x, R-ESRGAN 4x+, SwinIR_4x, ScuNET GAN, LDSR, DAT x2,
# 4x-UltraSharp, ...): refused as upscalers that need weights, not as unknown names
WEIGHTED_UPSCALER_TAGS = ("ESRGAN", "SwinIR", "ScuNET", "LDSR", "DAT", "4x", "2x")
DEFAULT_STRENGTH = 0.7  # A1111's txt2img UI default for hires fix
MAX_SCALE = 8.0
MAX_SCHEDULE = 1000  # the second pass's schedule length, as every request's steps
LATENT_FACTOR = 8  # A1111's opt_f: truncation counts latent cells of 8 pixels


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires-fix settings (enable_hr's companions in the txt2img API)."""

    scale: float = 2.0  # hr_scale, used when resize_width and resize_height are both 0
    resize_width: int = 0  # hr_resize_x
    resize_height: int = 0  # hr_resize_y
    upscaler: str = "Latent"  # hr_upscaler
    steps: int = 0  # hr_second_pass_steps: 0 runs as many as the first pass
    denoising_strength: float = DEFAULT_STRENGTH
    prompt: str = ""  # hr_prompt: "" keeps the first pass's
    negative_prompt: str = ""  # hr_negative_prompt
    sampler: str | None = None  # hr_sampler_name: None keeps the first pass's

    def check(self) -> None:
        """RequestError naming the setting that is out of range or unknown."""
        if self.upscaler not in UPSCALERS and any(tag in self.upscaler for tag in WEIGHTED_UPSCALER_TAGS):
            raise RequestError(f"hires upscaler '{self.upscaler}' runs a model whose weights sdfast cannot load yet; "
                               f"choose one of {', '.join(UPSCALERS)}")
        if self.upscaler not in UPSCALERS:
            raise RequestError(f"unknown hires upscaler '{self.upscaler}'; choose one of {', '.join(UPSCALERS)}")
        if not 1.0 <= self.scale <= MAX_SCALE:
            raise RequestError(f"hires scale must be from 1 to {MAX_SCALE:g}, not {self.scale}")
        if self.resize_width < 0 or self.resize_height < 0:
            raise RequestError("hires resize width and height must be 0 (unused) or positive")
        if not 0.0 < self.denoising_strength <= 1.0:
            raise RequestError(f"hires denoising strength must be above 0 and at most 1, not {self.denoising_strength}")
        if self.steps < 0:
            raise RequestError(f"hires steps must be 0 (as many as the first pass) or positive, not {self.steps}")

    def target(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((upscaled width, height), (latent cells cropped in x, in y)) from a ``width`` x ``height`` first pass
        (A1111's calculate_target_resolution: with both resize sides given, the larger fit is upscaled, then cropped)."""
        if self.resize_width == 0 and self.resize_height == 0:
            return (int(width * self.scale), int(height * self.scale)), (0, 0)
        if self.resize_height == 0:
            return (self.resize_width, self.resize_width * height // width), (0, 0)
        if self.resize_width == 0:
            return (self.resize_height * width // height, self.resize_height), (0, 0)
        if width / height < self.resize_width / self.resize_height:
            upscaled = (self.resize_width, self.resize_width * height // width)
        else:
            upscaled = (self.resize_height * width // height, self.resize_height)
        return upscaled, ((upscaled[0] - self.resize_width) // LATENT_FACTOR, (upscaled[1] - self.resize_height) // LATENT_FACTOR)

    def final_size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's image size: the upscaled latents, cropped, times 8."""
        (up_width, up_height), (crop_x, crop_y) = self.target(width, height)
        return (up_width // LATENT_FACTOR - crop_x) * LATENT_FACTOR, (up_height // LATENT_FACTOR - crop_y) * LATENT_FACTOR

    def schedule(self, first_steps: int) -> tuple[int, int]:
        """(the second pass's schedule length, the steps it runs): A1111's setup_img2img_steps for a hires pass."""
        run = self.steps or first_steps
        return int(run / min(self.denoising_strength, 0.999)), run

    def infotext(self, first_sampler: str, second_sampler: str, prompt: str, negative_prompt: str) -> dict[str, object]:
        """A1111's extra generation parameters for hires fix, in its order and wording."""
        resized = self.resize_width or self.resize_height
        return {
            "Hires sampler": second_sampler if second_sampler != first_sampler else None,
            "Hires prompt": self.prompt if self.prompt and self.prompt != prompt else None,
            "Hires negative prompt": self.negative_prompt if self.negative_prompt and self.negative_prompt != negative_prompt else None,
            "Hires upscale": None if resized else self.scale,
            "Hires resize": f"{self.resize_width}x{self.resize_height}" if resized else None,
            "Hires steps": self.steps or None,
            "Hires upscaler": self.upscaler,
        }


def upscale_latents(latents: np.ndarray, hires: HiresFix, width: int, height: int) -> np.ndarray:
    """First-pass latents [B, 4, h, w] -> [B, 4, H', W'] at the target, cropped as A1111 crops (latent upscalers)."""
    (up_width, up_height), (crop_x, crop_y) = hires.target(width, height)
    resized = resize_latents_a1111(latents, up_height // LATENT_FACTOR, up_width // LATENT_FACTOR, hires.upscaler)
    return _crop(resized, crop_x, crop_y)


def _crop(array: np.ndarray, crop_x: int, crop_y: int, cell: int = 1) -> np.ndarray:
    """[B, C, H, W] less ``crop_x`` / ``crop_y`` cells of ``cell`` pixels, split as A1111 splits them (the odd one at the end)."""
    height, width = array.shape[2], array.shape[3]
    return array[:, :, crop_y // 2 * cell:height - (crop_y + 1) // 2 * cell, crop_x // 2 * cell:width - (crop_x + 1) // 2 * cell]


def upscale_image(pixels: np.ndarray, width: int, height: int, upscaler: str) -> np.ndarray:
    """[H, W, 3] uint8 -> [height, width, 3] uint8 as A1111's images.resize_image(0, ...) with a weightless upscaler:
    Lanczos or nearest to the scale, rounded down to 8 pixels (Upscaler.upscale), then Lanczos to the exact size."""
    from PIL import Image

    image = Image.fromarray(pixels)
    scale = max(width / image.width, height / image.height)
    if upscaler != "None" and scale > 1.0:
        dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
        if image.width < dest[0] or image.height < dest[1]:
            method = Image.Resampling.LANCZOS if upscaler == "Lanczos" else Image.Resampling.NEAREST
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=method)
        if image.size != dest:
            image = image.resize(dest, resample=Image.Resampling.LANCZOS)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(image)


def check_request(request: "GenerationRequest", width: int, height: int, manifest) -> tuple[int, int]:
    """The second pass's size for a first pass at ``width`` x ``height``; RequestError for settings out of range, a
    size the engine dir (``manifest``) lacks, or what hires fix does not combine with."""
    hires = request.hires
    hires.check()
    if request.init_image is not None or request.init_latents is not None or request.control or request.refiner_switch is not None:
        raise RequestError("hires fix follows a txt2img first pass without ControlNet or refiner (not supported with them yet)")
    schedule, _ = hires.schedule(request.steps)
    if schedule > MAX_SCHEDULE:
        raise RequestError(f"hires denoising strength {hires.denoising_strength} gives a second pass of {schedule} scheduled steps "
                           f"(steps / strength); at most {MAX_SCHEDULE}: raise the strength or lower the hires steps")
    target = hires.final_size(width, height)
    if target not in manifest.sizes:
        raise RequestError(f"hires fix to {target[0]}x{target[1]} (from {width}x{height}): this engine dir serves "
                           f"{manifest.sizes_text} (export that size too: sdfast export --size {target[0]}x{target[1]})")
    return target


def second_pass_pipeline(pipeline: "Pipeline", request: "GenerationRequest") -> "Pipeline":
    """The engine dir's pipeline at the hires target size; RequestError when the dir lacks that size."""
    base = pipeline.at_size(request.width, request.height)
    return pipeline.at_size(*check_request(request, base.width, base.height, base.manifest))  # (with the LoRA directory)


@dataclass
class _Passes:
    """The two passes of a hires-fix request, checked."""

    base: "Pipeline"  # the first pass's size
    second: "Pipeline"  # the target size's
    batch: int
    first_sampler: str  # A1111 names, for the infotext
    second_sampler: str
    run: int  # the second pass's steps
    second_request: "GenerationRequest"  # without seeds and latents (per batch)


def _passes(pipeline: "Pipeline", request: "GenerationRequest") -> _Passes:
    """Both passes' requests, each checked by its size's checker; RequestError for anything either cannot serve."""
    second = second_pass_pipeline(pipeline, request)
    base = pipeline.at_size(request.width, request.height)
    first_request = dataclasses.replace(request, hires=None)
    first = base.checker.prepare(first_request)
    base.loras.for_request(first_request)
    hires = request.hires
    schedule, run = hires.schedule(request.steps)
    second_request = dataclasses.replace(
        request, hires=None, width=second.width, height=second.height, steps=schedule, start_step=schedule - run,
        strength=hires.denoising_strength, prompt=hires.prompt or request.prompt,
        negative_prompt=hires.negative_prompt or request.negative_prompt, sampler=hires.sampler or request.sampler, n_iter=1,
        batch_size=first.batch, seeds=None)
    placeholder = dataclasses.replace(second_request, init_latents=np.zeros((first.batch, *second.latent_shape), dtype=np.float32))
    try:
        second_spec = second.checker.prepare(placeholder).spec  # a sampler that cannot start part-way is refused here
    except RequestError as error:
        raise RequestError(f"hires pass: {error}") from None
    second.loras.for_request(placeholder)
    return _Passes(base, second, first.batch, first.spec.a1111_name, second_spec.a1111_name, run, second_request)


def check_hires(pipeline: "Pipeline", request: "GenerationRequest") -> None:
    """RequestError for a hires-fix request the engine dir cannot serve, before anything runs (the server's validate)."""
    _passes(pipeline, request)


def hires_batches(pipeline: "Pipeline", request: "GenerationRequest",
                  on_step: Callable[[int, int], None] | None, on_latents=None) -> Iterator["GenerationResult"]:
    """Each batch's first pass, upscale and second pass; the result carries the second pass's images with A1111's
    hires infotext. A stop in either pass yields what that pass has (A1111's interrupt) and ends the run."""
    from sdfast.runtime.infotexts import generation_infotext

    hires, passes = request.hires, _passes(pipeline, request)
    base, batch = passes.base, passes.batch
    latent = hires.upscaler in LATENT_MODES
    per_image = request.steps + passes.run
    total = per_image * request.n_iter
    for iteration in range(request.n_iter):
        seeds = ([request.seeds[iteration * batch + i] for i in range(batch)] if request.seeds is not None
                 else [request.seed + iteration * batch + i for i in range(batch)])
        done = iteration * per_image
        first_request = dataclasses.replace(request, hires=None, n_iter=1, seeds=seeds, batch_size=batch)
        first = next(base.generate_batches(first_request, (lambda d, _t, done=done: on_step(done + d, total)) if on_step else None,
                                           decode=not latent, on_latents=on_latents))
        if first.steps_run is not None:
            if latent:  # interrupted: A1111 answers with the first pass's image
                first.images = _decode(base, first.latents, request.vae_decoder)
            yield first
            return
        if latent:
            sized = dataclasses.replace(passes.second_request, seeds=seeds,
                                        init_latents=upscale_latents(first.latents, hires, base.width, base.height))
        else:
            upscaled = np.stack([upscale_image(pixels, *hires.target(base.width, base.height)[0], hires.upscaler) for pixels in first.images])
            sized = dataclasses.replace(passes.second_request, seeds=seeds, init_image=_cropped(upscaled, hires, base))
        later = (lambda d, _t, done=done + request.steps: on_step(done + d, total)) if on_step else None
        result = next(passes.second.generate_batches(sized, later, on_latents=on_latents))
        hires_text = hires.infotext(passes.first_sampler, passes.second_sampler, request.prompt, request.negative_prompt)
        stopped = None if result.steps_run is None else f"after {result.steps_run} of {passes.run} hires steps"
        result.parameters = [generation_infotext(base, request, passes.first_sampler, seed, batch, index, hires.denoising_strength,
                                                 stopped, hires_text) for index, seed in enumerate(seeds)]
        result.timings.text_encoder += first.timings.text_encoder
        result.timings.unet_steps[:0] = first.timings.unet_steps
        result.timings.vae_decode += first.timings.vae_decode
        result.timings.total += first.timings.total
        result.warnings[:0] = first.warnings
        yield result
        if result.steps_run is not None:
            return


def _decode(pipeline: "Pipeline", latents: np.ndarray, decoder: str = "full") -> np.ndarray:
    """Latents [B, 4, h, w] -> [B, H, W, 3] uint8 through the VAE decoder's fixed batch (padded, then cut)."""
    from sdfast.runtime.images import to_uint8

    padded = np.concatenate([latents, np.repeat(latents[:1], pipeline.batch_size - len(latents), axis=0)])
    return to_uint8(pipeline.decode(padded, decoder))[: len(latents)]  # an interrupted first pass: small, never tiled


def _cropped(images: np.ndarray, hires: HiresFix, base: "Pipeline") -> np.ndarray:
    """Upscaled images [B, H, W, 3] uint8 -> [B, 3, H', W'] in [-1, 1]: floored to whole latent cells (what the VAE
    encodes of an odd size), then cropped by whole cells as A1111 crops the encoded latents."""
    _, (crop_x, crop_y) = hires.target(base.width, base.height)
    f = LATENT_FACTOR
    height, width = images.shape[1] // f * f, images.shape[2] // f * f  # the VAE's latents floor a size to whole cells
    pixels = images[:, :height, :width].astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)  # as init_image_array
    return _crop(pixels * np.float32(2.0) - np.float32(1.0), crop_x, crop_y, f)
