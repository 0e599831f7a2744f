"""Stable Diffusion 1.x at run time: one CLIP text encoder whose hidden states are the U-Net's encoder_hidden_states."""
from __future__ import annotations

import numpy as np

from sdfast.runtime.families.base import Family, guided_rows


class StableDiffusion1(Family):
    name = "sd15"
    required = ("text_encoder", "unet", "vae_decoder")
    optional = ("vae_encoder", "vae_decoder_tiny", "vae_decoder_tile", "vae_encoder_tile", "unet_shallow", "unet_cond", "unet_int8", "unet_shallow_int8")  # img2img; the fast modes (export options)
    fed_inputs = {"text_encoder": ("input_ids", "clip_skip"), "unet": ("encoder_hidden_states",), "vae_decoder": ("latent",),
                  "vae_encoder": ("image",), "unet_cond": ("encoder_hidden_states",),
                  "unet_shallow": ("encoder_hidden_states", "step_cache_feature"), "vae_decoder_tiny": ("latents",), "vae_decoder_tile": ("latent",), "vae_encoder_tile": ("image",)}
    # live previews: latent channels -> RGB, A1111's cheap approximation for SD 1.x and 2.x (sd_vae_approx.py)
    preview_rgb = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))

    def __init__(self, manifest, engines):
        super().__init__(manifest, engines)
        self.text = self.prompt_encoder("text_encoder", "text encoder")

    def conditioning(self, prompt, negative_prompt, clip_skip, use_cfg, warnings):
        cond, uncond = self.text.encode_pair(prompt, negative_prompt, use_cfg, clip_skip, warnings)
        geometry = self.manifest.geometry
        hidden = guided_rows(cond.hidden, None if uncond is None else uncond.hidden, int(geometry["batch"]), bool(geometry["guidance"]))
        return {"encoder_hidden_states": hidden.astype(np.float32, copy=False)}  # [unet_batch, chunks * 77, 768]


FAMILY = StableDiffusion1
