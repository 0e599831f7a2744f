"""A tiny VAE decoder beside the full one: TAESD (Ollin Boer Bohan's Tiny AutoEncoder for Stable Diffusion), diffusers'
AutoencoderTiny, exported as the optional ``vae_decoder_tiny`` component for an opt-in fast decode.

``sdfast export --vae-decoder DIR`` takes an AutoencoderTiny folder (madebyollin/taesd, taesdxl, taesd3) or a built-in
name: ``taesd``, ``taesdxl``, ``taesd3`` (TAESD's architecture with random weights, for benchmarks) and ``tiny-taesd``
(a toy width, for tests). Its graph takes the denoiser's latents and applies the tiny VAE's own scaling and shift, as
diffusers' pipelines do (``latents / scaling_factor + shift_factor``), so the runtime feeds it the latents unchanged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdfast.errors import ConfigError

TINY = "vae_decoder_tiny"  # the component
FORMAT = 1  # bump when what a built-in folder holds changes

# name -> (AutoencoderTiny config beyond its defaults, which are TAESD's architecture; seed)
BUILTIN_TINY_VAES: dict[str, tuple[dict, int]] = {
    "taesd": ({}, 31),
    "taesdxl": ({}, 32),
    "taesd3": ({"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}, 33),
    "tiny-taesd": ({"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
                    "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1)}, 34),
}


def _cache() -> Path:
    return Path(os.environ.get("SDFAST_CACHE", Path.home() / ".cache" / "sdfast")) / "tiny-vaes"


def ensure_builtin_tiny_vae(name: str) -> Path:
    """The folder of a built-in tiny VAE (random weights, TAESD's architecture), saved once under $SDFAST_CACHE."""
    from diffusers import AutoencoderTiny

    from sdfast.export.built_once import built_once

    config, seed = BUILTIN_TINY_VAES[name]
    folder = _cache() / name
    stamp = folder / "sdfast-builtin.json"

    def build(staging: Path) -> None:
        torch.manual_seed(seed)
        AutoencoderTiny(**config).eval().save_pretrained(staging)
        (staging / "sdfast-builtin.json").write_text(json.dumps({"format": FORMAT, "random_weights": True}))  # last

    return built_once(folder, lambda: stamp.is_file() and json.loads(stamp.read_text()).get("format") == FORMAT, build)


def tiny_vae_folder(spec: str) -> Path:
    """A built-in name's folder, or ``spec`` as a folder; ConfigError when it is neither."""
    if spec in BUILTIN_TINY_VAES:
        return ensure_builtin_tiny_vae(spec)
    folder = Path(spec)
    config = folder / "config.json"
    if not config.is_file():
        raise ConfigError(f"--vae-decoder '{spec}' is not an AutoencoderTiny folder (no config.json) nor a built-in "
                          f"({', '.join(BUILTIN_TINY_VAES)})")
    try:
        class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"--vae-decoder '{spec}': config.json is not valid JSON") from None
    if class_name != "AutoencoderTiny":
        raise ConfigError(f"--vae-decoder '{spec}' holds a {class_name}, not an AutoencoderTiny (TAESD)")
    return folder


def load_tiny_vae(spec: str, latent_channels: int):
    """The AutoencoderTiny of ``spec`` in fp32, eval mode; ConfigError when its latent channels are not the model's."""
    from diffusers import AutoencoderTiny

    folder = tiny_vae_folder(spec)
    try:
        model = AutoencoderTiny.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"--vae-decoder '{spec}' cannot be loaded: {str(error).strip().splitlines()[0]}") from None
    if int(model.config.latent_channels) != latent_channels:
        raise ConfigError(f"--vae-decoder '{spec}' has {model.config.latent_channels} latent channels; this model's VAE has "
                          f"{latent_channels} (taesd and taesdxl: 4, taesd3: 16)")
    return model


class TinyVaeDecoder(torch.nn.Module):
    """latents [B, C, h, w] in the denoiser's space -> image [B, 3, H, W] in [-1, 1] (unclamped), as diffusers decodes
    with an AutoencoderTiny: decode(latents / scaling_factor + shift_factor)."""

    def __init__(self, model):
        super().__init__()
        self.vae = model.tiny_vae

    def forward(self, latents):
        config = self.vae.config
        scaled = latents / float(config.scaling_factor)
        shift = float(getattr(config, "shift_factor", 0.0) or 0.0)
        return self.vae.decode(scaled + shift if shift else scaled, return_dict=False)[0]
