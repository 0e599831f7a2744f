"""Stable Diffusion XL on the export side: two text encoders (the refiner has only the second), a U-Net conditioned on
text_embeds and time_ids, the VAE; their wrappers, sample inputs, dimensions and manifest blocks (recipe: export/sdxl.toml).

The conditioning follows diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids (Podell et al. 2023,
"SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", sec. 2.2 on size and crop conditioning).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdfast.export.families import sd15
from sdfast.export.controlnet_residuals import residual_shapes
from sdfast.export.step_cache import ShallowUNet, feature_dims, with_feature
from sdfast.export.families.sd15 import VaeDecoder, VaeEncoder, residual_arguments
from sdfast.export.recipe import ComponentRecipe
from sdfast.export.source import load_or_refuse, read_model_index, read_scheduler_config
from sdfast.export.staging import copy_tokenizer
from sdfast.export.tiny_vae import TinyVaeDecoder


@dataclass
class LoadedModel:
    """The PyTorch components of an SDXL folder, fp32, in eval mode; ``text_encoder`` is None for the refiner."""

    folder: Path
    text_encoder: object | None
    text_encoder_2: object
    unet: object
    vae: object
    tokenizer: object | None
    tokenizer_2: object
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool  # model_index.json: an empty negative prompt is zeros, not the encoding of ""
    requires_aesthetics_score: bool  # the refiner's time ids end with an aesthetic score instead of the target size


def load(folder: Path, request=None) -> LoadedModel:
    """The folder's text encoders, U-Net and VAE in fp32; the scheduler config is read (and refused) first."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    scheduler_config = read_scheduler_config(folder)
    index = read_model_index(folder)
    has_first = (folder / "text_encoder").is_dir() and (index.get("text_encoder") or [None])[0] is not None
    text_encoder = tokenizer = None
    if has_first:
        text_encoder = load_or_refuse(folder, "text_encoder", lambda: CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32))
        tokenizer = load_or_refuse(folder, "tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    text_encoder_2 = load_or_refuse(folder, "text_encoder_2", lambda: CLIPTextModelWithProjection.from_pretrained(
        folder / "text_encoder_2", torch_dtype=torch.float32))
    tokenizer_2 = load_or_refuse(folder, "tokenizer_2", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
    unet = load_or_refuse(folder, "unet", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32))
    vae = load_or_refuse(folder, "vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32))
    for module in (text_encoder, text_encoder_2, unet, vae):
        if module is not None:
            module.eval().requires_grad_(False)
    return LoadedModel(folder, text_encoder, text_encoder_2, unet, vae, tokenizer, tokenizer_2, scheduler_config,
                       bool(index.get("force_zeros_for_empty_prompt", True)), bool(index.get("requires_aesthetics_score", False)))


def components(recipe, model: LoadedModel) -> list[str]:
    """The recipe's components this folder has: the refiner has no first text encoder."""
    return [name for name in recipe.component_names if name != "text_encoder" or model.text_encoder is not None]


class _PenultimateTextEncoder(torch.nn.Module):
    """(input_ids [B, 77], clip_skip [1]) -> hidden_states[-(clip_skip + 1)] [B, 77, D], no final layer norm.

    A1111's clip skip k (1 = the penultimate layer, SDXL's default) is diffusers' SDXL ``clip_skip = k - 1``.
    """

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def layer(self, outputs, clip_skip):
        layers = torch.stack(outputs.hidden_states)  # layers: [L + 1, B, 77, D]; index 0 is the embeddings
        index = (layers.shape[0] - 1 - clip_skip).clamp(1, layers.shape[0] - 1)  # the runtime refuses out-of-range values
        return layers.index_select(0, index.reshape(1)).squeeze(0)


class TextEncoder(_PenultimateTextEncoder):
    """CLIP ViT-L: (input_ids, clip_skip) -> prompt_embeds [B, 77, 768]."""

    def __init__(self, model: LoadedModel):
        super().__init__(model.text_encoder)

    def forward(self, input_ids, clip_skip):
        return self.layer(self.encoder(input_ids, output_hidden_states=True, return_dict=True), clip_skip)


class ProjectedTextEncoder(_PenultimateTextEncoder):
    """A CLIP with projection: (input_ids, clip_skip) -> (prompt_embeds [B, 77, D], text_embeds [B, P] projected pooled)."""

    def forward(self, input_ids, clip_skip):
        outputs = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        return self.layer(outputs, clip_skip), outputs.text_embeds


class TextEncoder2(ProjectedTextEncoder):
    """OpenCLIP ViT-bigG: (input_ids, clip_skip) -> (prompt_embeds [B, 77, 1280], text_embeds [B, 1280])."""

    def __init__(self, model: LoadedModel):
        super().__init__(model.text_encoder_2)


class UNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, text_embeds [B, 1280], time_ids [B, 6 or 5], *ControlNet residuals)
    -> noise_pred [B, 4, h, w] (the residuals as in sd15.UNet)."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.unet, self.step_cache_depth = model.unet, getattr(model, "step_cache_depth", None)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return with_feature(self.unet, self.step_cache_depth, lambda: self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False,
            **residual_arguments(residuals))[0])


# The fp16 rules are SD 1.x's: the fp16-fix VAE runs fp16, upcast_attention keeps attention scores fp32.
fp16_safe = sd15.fp16_safe
fp32_attention_scores = sd15.fp32_attention_scores

WRAPPERS = {"text_encoder": TextEncoder, "text_encoder_2": TextEncoder2, "unet": UNet, "unet_cond": UNet, "unet_shallow": ShallowUNet, "vae_decoder": VaeDecoder, "vae_decoder_tiny": TinyVaeDecoder, "vae_decoder_tile": VaeDecoder, "vae_encoder_tile": VaeEncoder,
            "vae_encoder": VaeEncoder}

# The PyTorch modules each component is the last to need: the export frees them once its parity outputs are computed.
RELEASES = {"text_encoder": ("text_encoder",), "text_encoder_2": ("text_encoder_2",), "unet": ("unet",), "vae_encoder": ("vae",)}


def sample_inputs(recipe: ComponentRecipe, model: LoadedModel, purpose: str = "trace", seed: int = 1234) -> dict[str, np.ndarray]:
    """Seeded inputs in each input's realistic range (time ids as the pipeline makes them), for tracing or parity."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in recipe.inputs:
        shape = tensor.concrete_shape(recipe.dynamic, purpose)
        if tensor.name == "input_ids":
            value = rng.integers(0, int(model.text_encoder_2.config.vocab_size), size=shape, dtype=np.int64)
        elif tensor.name == "clip_skip":
            value = np.full(shape, 2 if purpose == "trace" else 1, dtype=np.int64)
        elif tensor.name == "timestep":
            value = np.linspace(999, 1, shape[0]).astype(np.float32)
        elif tensor.name == "image":
            value = rng.uniform(-1, 1, size=shape).astype(np.float32)
        elif tensor.name == "latent":
            value = (rng.standard_normal(shape) / float(model.vae.config.scaling_factor)).astype(np.float32)
        elif tensor.name == "time_ids":
            size = 8 * int(model.unet.config.sample_size)
            row = [size, size, 0, 0, 6.0] if shape[1] == 5 else [size, size, 0, 0, size, size]
            value = np.tile(np.asarray(row, dtype=np.float32), (shape[0], 1))
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        inputs[tensor.name] = value
    return inputs


def dimensions(request, recipe, model: LoadedModel) -> dict[str, int]:
    factor = recipe.latent_factor
    native = int(model.unet.config.sample_size) * factor
    height, width = request.height or native, request.width or native
    encoders = [e for e in (model.text_encoder, model.text_encoder_2) if e is not None]
    text_length = min([int(model.tokenizer_2.model_max_length)] + [int(e.config.max_position_embeddings) for e in encoders])
    hidden = [int(e.config.hidden_size) for e in encoders]
    return {
        "height": height, "width": width, "batch": request.batch,
        "unet_batch": request.batch * (2 if request.guidance else 1),
        "latent_height": height // factor, "latent_width": width // factor,
        "latent_channels": int(model.vae.config.latent_channels), "unet_in_channels": int(model.unet.config.in_channels),
        "text_length": text_length, "text_hidden_1": hidden[0] if model.text_encoder is not None else 0,
        "text_hidden_2": hidden[-1], "context_dim": int(model.unet.config.cross_attention_dim),
        "pooled_dim": int(model.text_encoder_2.config.projection_dim), "time_ids_dim": 5 if model.requires_aesthetics_score else 6,
        "max_text_chunks": request.max_prompt_chunks or int(recipe.defaults.get("max_text_chunks", 1)),
        "control_residuals": residual_shapes(model.unet, height // factor, width // factor)
        if getattr(request, "controlnet_inputs", True) else [],
        "step_cache_feature": feature_dims(model.unet, getattr(model, "step_cache_depth", None), height // factor, width // factor),
    }


def manifest_blocks(recipe, model: LoadedModel, dims: dict[str, int]) -> dict:
    """The latent layout, the parametrization, and what the runtime's conditioning needs: the encoders' layer counts,
    the empty-prompt rule and the time ids' layout."""
    layers = [int(e.config.num_hidden_layers) for e in (model.text_encoder, model.text_encoder_2) if e is not None]
    return {
        "latent": {
            "channels": dims["latent_channels"], "factor": recipe.latent_factor,
            "scaling_factor": float(model.vae.config.scaling_factor),
            "shift_factor": float(getattr(model.vae.config, "shift_factor", None) or 0.0),
        },
        "parametrization": {"prediction_type": model.scheduler_config.get("prediction_type") or "epsilon"},
        "model": {
            "unet_in_channels": dims["unet_in_channels"],
            "text_hidden": dims["context_dim"],
            "text_layers": min(layers) - 1,  # clip skip k takes hidden_states[-(k + 1)]: at most the first layer's output
            "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
            "time_ids": "aesthetic_score" if model.requires_aesthetics_score else "size",
        },
    }


def tokenizers(model: LoadedModel, folder: Path, staging: Path, dims: dict[str, int]) -> dict[str, dict]:
    """The tokenizers, keyed by the text encoder each feeds: CLIP-L's pads with its EOS, OpenCLIP's with "!" (id 0)."""
    entries = {"text_encoder_2": copy_tokenizer(model.tokenizer_2, folder / "tokenizer_2", staging, "tokenizer_2", dims["text_length"])}
    if model.text_encoder is not None:
        entries["text_encoder"] = copy_tokenizer(model.tokenizer, folder / "tokenizer", staging, "tokenizer", dims["text_length"])
    return entries
