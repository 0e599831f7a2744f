"""Stable Diffusion 3 and 3.5 at run time: the two CLIP encoders' penultimate layers side by side, zero-padded to T5's
width and followed by T5's tokens (zeros for an engine exported without T5), and the pooled projections side by side.

As diffusers' StableDiffusion3Pipeline.encode_prompt builds them: no A1111 chunking or emphasis (a "(word:1.3)" is
plain text), each prompt cut at CLIP's 77 tokens and T5's 256 (max_sequence_length) with a warning naming how many
were dropped, and a silent negative prompt encoded as "" (SD3 has no force_zeros_for_empty_prompt).
"""
from __future__ import annotations

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.device_loop import check_finite
from sdfast.runtime.families.base import Family, guided_rows


class StableDiffusion3(Family):
    name = "sd3"
    required = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    optional = ("text_encoder_3", "vae_encoder", "vae_decoder_tiny", "vae_decoder_tile", "vae_encoder_tile")  # T5 (export --t5), img2img and inpainting
    default_cfg_scale = 7.0  # StableDiffusion3Pipeline's
    fed_inputs = {"text_encoder": ("input_ids", "clip_skip"), "text_encoder_2": ("input_ids", "clip_skip"),
                  "text_encoder_3": ("input_ids",), "transformer": ("encoder_hidden_states", "pooled_projections", "layer_keep"), "vae_decoder": ("latent",), "vae_encoder": ("image",),
                  "vae_decoder_tiny": ("latents",), "vae_decoder_tile": ("latent",), "vae_encoder_tile": ("image",)}
    # live previews: A1111's cheap approximation for SD3's 16 latent channels (sd_vae_approx.py)
    preview_rgb = ((-0.0645, 0.0177, 0.1052), (0.0028, 0.0312, 0.0650), (0.1848, 0.0762, 0.0360), (0.0944, 0.0360, 0.0889),
                   (0.0897, 0.0506, -0.0364), (-0.0020, 0.1203, 0.0284), (0.0855, 0.0118, 0.0283), (-0.0539, 0.0658, 0.1047),
                   (-0.0057, 0.0116, 0.0700), (-0.0412, 0.0281, -0.0039), (0.1106, 0.1171, 0.1220), (-0.0248, 0.0682, -0.0481),
                   (0.0815, 0.0846, 0.1207), (-0.0120, -0.0055, -0.0867), (-0.0749, -0.0634, -0.0456), (-0.1418, -0.1457, -0.1259))

    @staticmethod
    def img2img_start_step(steps: int, strength: float) -> int:
        """StableDiffusion3Img2ImgPipeline.get_timesteps: int(steps - steps x strength), unrounded inside (6 steps at
        strength 0.6 run 4, where SD's pipelines run 3)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def __init__(self, manifest, engines):
        super().__init__(manifest, engines)
        self.encoders = [self.prompt_encoder(name, f"text encoder {index}") for index, name in enumerate(("text_encoder", "text_encoder_2"), 1)]
        context = engines["transformer"].info.input("encoder_hidden_states").shape  # [unet_batch, 77 + T5 tokens, joint width]
        self.t5_tokens, self.joint_width = int(context[1]) - self.encoders[0].tokenizer.max_length, int(context[2])
        if self.t5_tokens < 0 or bool(manifest.model.get("t5")) != ("text_encoder_3" in engines):
            raise EngineError(f"engine dir {manifest.root}: its transformer's context does not match this sdfast's SD3 conditioning (re-export)")
        self.layers = int(engines["transformer"].info.input("layer_keep").shape[0])  # the transformer's blocks
        self.t5 = None
        if "text_encoder_3" in engines:
            from sdfast.runtime.tokenizer import PromptTokenizer

            tok = manifest.tokenizers["text_encoder_3"]
            self.t5 = PromptTokenizer(manifest.path(tok["file"]), tok["bos_id"], tok["eos_id"], tok["pad_id"], tok["max_length"])

    def _encode(self, text: str, clip_skip: int, label: str, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(context [77 + T5 tokens, joint width], pooled [P1 + P2]) of one prompt."""
        hidden, pooled = [], []
        for index, encoder in enumerate(self.encoders):
            tokens = encoder.tokenizer.encode(text)
            if tokens.dropped_tokens and index == 0:
                warnings.append(f"{label} is longer than CLIP's {encoder.tokenizer.max_length - 2} tokens: its last "
                                f"{tokens.dropped_tokens} were dropped, as diffusers' SD3 pipeline drops them")
            layer, projected = encoder.run(tokens.ids[None], clip_skip)  # [1, 77, D], [1, P]
            hidden.append(layer[0])
            pooled.append(projected[0])
        clip = np.concatenate(hidden, axis=-1)  # [77, D1 + D2]
        context = np.zeros((clip.shape[0] + self.t5_tokens, self.joint_width), dtype=np.float32)  # without T5 its rows stay zero
        context[: clip.shape[0], : clip.shape[1]] = clip
        if self.t5 is not None:
            tokens = self.t5.encode(text)  # ids [256]: the prompt, "</s>", "<pad>"s
            if tokens.dropped_tokens:
                warnings.append(f"{label} is longer than T5's {self.t5.max_length - 1} tokens: its last {tokens.dropped_tokens} "
                                "were dropped, as diffusers' SD3 pipeline drops them (max_sequence_length)")
            (t5,) = self.engines["text_encoder_3"].run({"input_ids": tokens.ids[None]})  # [1, 256, 4096]
            context[clip.shape[0]:] = check_finite("T5 text encoder", t5)[0]
        return context, np.concatenate(pooled)

    def conditioning(self, prompt, negative_prompt, clip_skip, use_cfg, warnings):
        cond_context, cond_pooled = self._encode(prompt, clip_skip, "the prompt", warnings)
        uncond_context = uncond_pooled = None
        if use_cfg:  # diffusers encodes the negative prompt at the default layer whatever clip_skip says
            uncond_context, uncond_pooled = self._encode(negative_prompt, 1, "the negative prompt", warnings)
        rows, guidance = int(self.manifest.geometry["batch"]), bool(self.manifest.geometry["guidance"])
        return {
            "encoder_hidden_states": guided_rows(cond_context, uncond_context, rows, guidance),
            "pooled_projections": guided_rows(cond_pooled, uncond_pooled, rows, guidance).astype(np.float32, copy=False),
            "layer_keep": np.ones(self.layers, dtype=np.float32),  # every block
        }

    def skip_layer_feeds(self, conditioning, layers):
        """The prompt's rows (the second half of a guided batch) in every row, and ``layers`` skipped (checked in range by
        RequestChecker)."""
        keep = np.ones(self.layers, dtype=np.float32)
        keep[list(layers)] = 0.0
        prompt_rows = {name: np.concatenate([value[len(value) // 2:]] * 2) for name, value in conditioning.items() if name != "layer_keep"}
        return {**prompt_rows, "layer_keep": keep}


FAMILY = StableDiffusion3
