"""Stable Diffusion 1.x at run time: one CLIP text encoder whose hidden states are the U-Net's encoder_hidden_states."""
from __future__ import annotations

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.families.base import Family, guided_rows
from sdfast.runtime.text_encoding import PromptEncoder
from sdfast.runtime.tokenizer import PromptTokenizer


class StableDiffusion1(Family):
    name = "sd15"
    required = ("text_encoder", "unet", "vae_decoder")
    optional = ("vae_encoder",)
    fed_inputs = {"text_encoder": ("input_ids", "clip_skip"), "unet": ("encoder_hidden_states",), "vae_decoder": ("latent",),
                  "vae_encoder": ("image",)}

    def __init__(self, manifest, engines):
        super().__init__(manifest, engines)
        tok = manifest.tokenizers.get("text_encoder")
        if tok is None:
            raise EngineError(f"engine dir {manifest.root}: the manifest has no tokenizer for text_encoder (re-export the model)")
        tokenizer = PromptTokenizer(manifest.path(tok["file"]), tok["bos_id"], tok["eos_id"], tok["pad_id"], tok["max_length"])
        self.text = PromptEncoder(tokenizer, engines["text_encoder"], int(manifest.geometry["max_text_chunks"]))

    def conditioning(self, prompt, negative_prompt, clip_skip, use_cfg, warnings):
        cond, uncond = self.text.encode_pair(prompt, negative_prompt, use_cfg, clip_skip, warnings)
        geometry = self.manifest.geometry
        hidden = guided_rows(cond.hidden, None if uncond is None else uncond.hidden, int(geometry["batch"]), bool(geometry["guidance"]))
        return {"encoder_hidden_states": hidden.astype(np.float32, copy=False)}  # [unet_batch, chunks * 77, 768]


FAMILY = StableDiffusion1
