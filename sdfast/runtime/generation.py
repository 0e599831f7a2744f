"""What a generation takes and gives: the request, per-stage timings, and the result (images, seeds, infotexts)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sdfast.runtime.hires import HiresFix


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
    batch_size: int | None = None  # images per U-Net call, 1 .. the engine's batch (None: the engine's)
    n_iter: int = 1  # batches run one after another; image k of the whole run gets seed + k, as A1111
    clip_skip: int = 1  # A1111's "Clip skip": 1 is the last text-encoder layer
    init_image: np.ndarray | None = None  # [1, 3, H, W] in [-1, 1] (images.load_init_image): img2img / inpainting
    mask: np.ndarray | None = None  # [1, 1, H, W] of 0 and 1, 1 = repaint (images.load_mask): inpainting
    strength: float | None = None  # img2img denoising strength; None: 0.75 (A1111), 1.0 on a 9-channel inpainting engine
    eta: float = 0.0  # DDIM's eta: 0 is deterministic DDIM, 1 adds DDPM-like noise from the seed's generator
    refiner_switch: float | None = None  # hand over to the attached refiner at this fraction of the schedule (SDXL), or None
    seeds: list[int] | None = None  # one seed per image (batch_size x n_iter), instead of seed, seed + 1, ... (the server's micro-batches)
    skip_layer_guidance: SkipLayerGuidance | None = None  # SD3.5's skip-layer guidance, or None
    control: tuple = ()  # ControlNet units (runtime.control.ControlUnit), their residuals summed
    loras: tuple = ()  # LoRAs beside the prompt's <lora:name:weight> tags (runtime.lora.prompt_tags.LoraUse), by name
    hires: "HiresFix | None" = None  # A1111's hires fix (runtime.hires): first pass at this size, img2img at the larger one
    init_latents: np.ndarray | None = None  # [B, 4, h, w] latents to start img2img from instead of an image (hires fix's latent upscalers)
    start_step: int | None = None  # img2img: the step the plan starts at, instead of the strength's rounding (A1111's hires pass)
    step_cache: int | None = None  # DeepCache: the full U-Net every this many evaluations, the shallow U-Net between (runtime.step_cache)
    vae_decoder: str = "full"  # "tiny": the engine dir's tiny VAE decoder (TAESD, export --vae-decoder), a fast approximate decode
    guidance_stop: float | None = None  # guidance truncation: the unconditional half skipped after this fraction of the steps
    int8: bool = False  # the engine dir's selective int8 U-Net (sdfast quantize) instead of the fp32 one (runtime.int8_unet)
    vae_tiling: bool = False  # decode (and encode) in blended tiles through the engine dir's tile graphs (export --vae-tile)


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance as StableDiffusion3Pipeline runs it (SD3.5 Medium's recipe: layers 7, 8, 9 at 2.8, from 1% to 20%).

    At evaluation i with steps x start < i < steps x stop, the guided prediction gains scale x (cond - cond without
    ``layers``): a third transformer call on the prompt's rows with those blocks skipped.
    """

    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def active(self, evaluation: int, steps: int) -> bool:
        """diffusers' test, on the index of the model evaluation (its enumerate over the scheduler's timesteps)."""
        return steps * self.start < evaluation < steps * self.stop


@dataclass
class StageTimings:
    """Wall seconds per stage of one generation."""

    text_encoder: float = 0.0
    vae_encode: float = 0.0
    unet_steps: list[float] = field(default_factory=list)
    vae_decode: float = 0.0
    total: float = 0.0
    controlnet_s: float = 0.0  # of the U-Net steps, the seconds the ControlNets took (each step's time includes them)
    host_queue_s: float | None = None  # device loops: host seconds spent queuing the steps (the GPU waits only if this exceeds them)

    def summary(self) -> dict[str, float]:
        steps = sorted(self.unet_steps)
        return {
            "text_encoder_ms": self.text_encoder * 1e3,
            "vae_encode_ms": self.vae_encode * 1e3,
            "unet_step_median_ms": float(np.median(steps)) * 1e3 if steps else 0.0,
            "unet_step_min_ms": steps[0] * 1e3 if steps else 0.0,
            "unet_step_max_ms": steps[-1] * 1e3 if steps else 0.0,
            "unet_total_ms": sum(steps) * 1e3,
            "vae_decode_ms": self.vae_decode * 1e3,
            "total_ms": self.total * 1e3,
        }


@dataclass
class GenerationResult:
    images: np.ndarray  # [N, H, W, 3] uint8, N = batch_size x n_iter
    seeds: list[int]
    parameters: list[str]  # A1111 infotext per image
    latents: np.ndarray  # [N, 4, H/8, W/8] final latents, before the VAE scaling
    timings: StageTimings
    warnings: list[str]
    steps_run: int | None = None  # None: every step ran; else sampling was stopped (StopSampling) after this many, latents = its x0
