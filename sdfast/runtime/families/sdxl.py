"""Stable Diffusion XL at run time: two CLIP encoders' penultimate layers side by side, encoder 2's pooled projection as
``text_embeds``, and ``time_ids`` from the image size (or, for the refiner, an aesthetic score).

As diffusers' StableDiffusionXLPipeline and A1111 build them (Podell et al. 2023, "SDXL", sec. 2.2): an empty negative
prompt on a model whose index sets force_zeros_for_empty_prompt is zeros (hidden states and pooled), not the encoding
of ""; A1111's chunking and emphasis run through each encoder on its own; the pooled output is the first chunk's.
"""
from __future__ import annotations

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.families.base import Family, guided_rows

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' StableDiffusionXLImg2ImgPipeline and A1111's defaults


class StableDiffusionXL(Family):
    name = "sdxl"
    required = ("text_encoder_2", "unet", "vae_decoder")
    optional = ("text_encoder", "vae_encoder", "vae_decoder_tiny", "vae_decoder_tile", "vae_encoder_tile", "unet_shallow", "unet_cond", "unet_int8", "unet_shallow_int8")  # the refiner has only encoder 2; fast modes
    default_cfg_scale = 5.0  # StableDiffusionXLPipeline's
    fed_inputs = {"text_encoder": ("input_ids", "clip_skip"), "text_encoder_2": ("input_ids", "clip_skip"),
                  "unet": ("encoder_hidden_states", "text_embeds", "time_ids"), "vae_decoder": ("latent",), "vae_encoder": ("image",),
                  "unet_cond": ("encoder_hidden_states", "text_embeds", "time_ids"), "vae_decoder_tiny": ("latents",), "vae_decoder_tile": ("latent",), "vae_encoder_tile": ("image",),
                  "unet_shallow": ("encoder_hidden_states", "text_embeds", "time_ids", "step_cache_feature")}
    # live previews: A1111's cheap approximation for SDXL latents (sd_vae_approx.py)
    preview_rgb = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088))

    def __init__(self, manifest, engines):
        super().__init__(manifest, engines)
        names = [name for name in ("text_encoder", "text_encoder_2") if name in engines]
        self.encoders = [self.prompt_encoder(name, f"text encoder {index}") for index, name in enumerate(names, 1)]
        model = manifest.model
        self.force_zeros = bool(model.get("force_zeros_for_empty_prompt", False))
        if model.get("time_ids") not in ("size", "aesthetic_score"):
            raise EngineError(f"engine dir {manifest.root}: the manifest's model.time_ids must be 'size' or 'aesthetic_score' (re-export)")
        self.time_ids_layout = model["time_ids"]

    def time_ids(self, negative: bool) -> np.ndarray:
        """[6]: original size, crop top-left, target size (h, w each; no crop); the refiner's [5] ends in an aesthetic score."""
        height, width = int(self.manifest.geometry["height"]), int(self.manifest.geometry["width"])
        if self.time_ids_layout == "aesthetic_score":
            return np.asarray([height, width, 0, 0, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE], dtype=np.float32)
        return np.asarray([height, width, 0, 0, height, width], dtype=np.float32)

    def conditioning(self, prompt, negative_prompt, clip_skip, use_cfg, warnings):
        zero_negative = use_cfg and negative_prompt == "" and self.force_zeros
        encode_negative = use_cfg and not zero_negative
        pairs = [encoder.encode_pair(prompt, negative_prompt, encode_negative, clip_skip, warnings if index == 0 else [])
                 for index, encoder in enumerate(self.encoders)]  # each encoder warns alike of a long prompt: once is enough
        if len({cond.chunks for cond, _ in pairs}) > 1:
            raise EngineError("the two tokenizers cut the prompt into different numbers of chunks (mismatched tokenizers?)")
        cond_hidden = np.concatenate([cond.hidden for cond, _ in pairs], axis=-1)  # [C * 77, 768 + 1280]
        cond_pooled = pairs[-1][0].pooled  # [1280]: encoder 2's
        if zero_negative:
            uncond_hidden, uncond_pooled = np.zeros_like(cond_hidden), np.zeros_like(cond_pooled)
        elif encode_negative:
            uncond_hidden, uncond_pooled = np.concatenate([uncond.hidden for _, uncond in pairs], axis=-1), pairs[-1][1].pooled
        else:
            uncond_hidden = uncond_pooled = None
        rows, guidance = int(self.manifest.geometry["batch"]), bool(self.manifest.geometry["guidance"])
        guided_time_ids = self.time_ids(negative=True) if use_cfg else None
        return {
            "encoder_hidden_states": guided_rows(cond_hidden, uncond_hidden, rows, guidance).astype(np.float32, copy=False),
            "text_embeds": guided_rows(cond_pooled, uncond_pooled, rows, guidance).astype(np.float32, copy=False),
            "time_ids": guided_rows(self.time_ids(negative=False), guided_time_ids, rows, guidance),
        }


FAMILY = StableDiffusionXL
