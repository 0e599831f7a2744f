"""Stable Diffusion 1.x on the export side: loading the folder, the modules that become the engine's ONNX files, their
sample inputs, the export's dimensions and the manifest's family blocks (recipe: export/sd15.toml)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdfast.export.controlnet_residuals import residual_shapes
from sdfast.export.recipe import ComponentRecipe
from sdfast.export.staging import copy_tokenizer
from sdfast.export.step_cache import ShallowUNet, feature_dims, with_feature
from sdfast.export.source import load_or_refuse, read_scheduler_config
from sdfast.export.tiny_vae import TinyVaeDecoder


@dataclass
class LoadedModel:
    """The PyTorch components of a Stable Diffusion folder, fp32, in eval mode."""

    folder: Path
    text_encoder: object
    unet: object
    vae: object
    tokenizer: object
    scheduler_config: dict


def load(folder: Path, request=None) -> LoadedModel:
    """The folder's CLIP text encoder, U-Net and VAE in fp32, eval mode; the scheduler config is read (and refused) first."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_config = read_scheduler_config(folder)
    text_encoder = load_or_refuse(folder, "text_encoder", lambda: CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32))
    unet = load_or_refuse(folder, "unet", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32))
    vae = load_or_refuse(folder, "vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32))
    tokenizer = load_or_refuse(folder, "tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    return LoadedModel(folder, text_encoder, unet, vae, tokenizer, scheduler_config)


class TextEncoder(torch.nn.Module):
    """(input_ids [B, 77], clip_skip [1]) -> prompt_embeds [B, 77, D]: layer -clip_skip's hidden state, final-layer-normed.

    A1111's "Clip skip" (1 = the last layer, which is diffusers' prompt_embeds; diffusers' ``clip_skip=k`` is ours k + 1).
    """

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.text_encoder = model.text_encoder
        # transformers 5 moved the layer norm from CLIPTextModel.text_model to CLIPTextModel itself
        self.final_layer_norm = getattr(model.text_encoder, "text_model", model.text_encoder).final_layer_norm

    def forward(self, input_ids, clip_skip):
        hidden_states = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True).hidden_states
        layers = torch.stack(hidden_states[1:])  # layers: [L, B, 77, D]; hidden_states[0] is the embeddings
        index = (layers.shape[0] - clip_skip).clamp(0, layers.shape[0] - 1)  # the runtime refuses out-of-range values
        return self.final_layer_norm(layers.index_select(0, index.reshape(1)).squeeze(0))


class UNet(torch.nn.Module):
    """(sample [B, C, h, w], timestep [B], encoder_hidden_states [B, 77, D], *ControlNet residuals) -> noise_pred [B, 4, h, w].

    The residuals (down blocks', then the mid block's; see controlnet_residuals) are added to the skip connections as
    diffusers' down_block_additional_residuals and mid_block_additional_residual; an export without them has none.
    """

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.unet, self.step_cache_depth = model.unet, getattr(model, "step_cache_depth", None)

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        control = residual_arguments(residuals)
        # with --step-cache also the deep feature the shallow U-Net reuses (step_cache.py)
        return with_feature(self.unet, self.step_cache_depth, lambda: self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **control)[0])


def residual_arguments(residuals: tuple) -> dict:
    """The U-Net's ControlNet keyword arguments from the residual inputs (down blocks', then the mid block's)."""
    if not residuals:
        return {}
    return {"down_block_additional_residuals": tuple(residuals[:-1]), "mid_block_additional_residual": residuals[-1]}


class VaeDecoder(torch.nn.Module):
    """latent [B, 4, h, w], already divided by the scaling factor -> image [B, 3, H, W] in [-1, 1] (unclamped)."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.vae = model.vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> (mean, std) of the diagonal Gaussian posterior, each [B, 4, h, w]."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.vae = model.vae

    def forward(self, image):
        posterior = self.vae.encode(image, return_dict=False)[0]
        return posterior.mean, posterior.std


WRAPPERS = {"text_encoder": TextEncoder, "unet": UNet, "unet_cond": UNet, "unet_shallow": ShallowUNet, "vae_decoder": VaeDecoder, "vae_decoder_tiny": TinyVaeDecoder, "vae_decoder_tile": VaeDecoder, "vae_encoder_tile": VaeEncoder, "vae_encoder": VaeEncoder}

# The PyTorch modules each component is the last to need: the export frees them once its parity outputs are computed.
RELEASES = {"text_encoder": ("text_encoder",), "unet": ("unet",), "vae_encoder": ("vae",)}


def sample_inputs(recipe: ComponentRecipe, model: LoadedModel, purpose: str = "trace", seed: int = 1234) -> dict[str, np.ndarray]:
    """Seeded inputs in each input's realistic range, for tracing (``purpose='trace'``) or the parity check ('parity').

    The two differ where the graph must not be tied to the traced value: dynamic axes and clip_skip.
    """
    rng = np.random.default_rng(seed)
    scaling = float(model.vae.config.scaling_factor)
    inputs = {}
    for tensor in recipe.inputs:
        shape = tensor.concrete_shape(recipe.dynamic, purpose)
        if tensor.name == "input_ids":
            vocab = int(model.text_encoder.config.vocab_size)
            value = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif tensor.name == "clip_skip":
            value = np.full(shape, 2 if purpose == "trace" else 1, dtype=np.int64)
        elif tensor.name == "timestep":
            value = np.linspace(999, 1, shape[0]).astype(np.float32)
        elif tensor.name == "image":
            value = rng.uniform(-1, 1, size=shape).astype(np.float32)
        elif tensor.name == "latent":
            value = (rng.standard_normal(shape) / scaling).astype(np.float32)
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        inputs[tensor.name] = value
    return inputs


def dimensions(request, recipe, model: LoadedModel) -> dict[str, int]:
    factor = recipe.latent_factor
    native = int(model.unet.config.sample_size) * factor
    height = request.height or native
    width = request.width or native
    text_length = int(model.tokenizer.model_max_length)
    if text_length > int(model.text_encoder.config.max_position_embeddings):
        text_length = int(model.text_encoder.config.max_position_embeddings)
    return {
        "height": height, "width": width, "batch": request.batch,
        "unet_batch": request.batch * (2 if request.guidance else 1),
        "latent_height": height // factor, "latent_width": width // factor,
        "latent_channels": int(model.vae.config.latent_channels), "unet_in_channels": int(model.unet.config.in_channels),
        "text_length": text_length, "text_hidden": int(model.text_encoder.config.hidden_size),
        "max_text_chunks": request.max_prompt_chunks or int(recipe.defaults.get("max_text_chunks", 1)),
        "control_residuals": residual_shapes(model.unet, height // factor, width // factor)
        if getattr(request, "controlnet_inputs", True) else [],
        "step_cache_feature": feature_dims(model.unet, getattr(model, "step_cache_depth", None), height // factor, width // factor),
    }


def fp32_attention_scores(model: LoadedModel, name: str) -> str | None:
    """The fp16 policy's attention rule: a U-Net whose config sets upcast_attention (SD 2.1) keeps its scores fp32."""
    if name == "unet" and getattr(model.unet.config, "upcast_attention", False):
        return "the U-Net sets upcast_attention: its attention scores overflow fp16 (SD 2.1), as diffusers upcasts them"
    return None


def fp16_safe(model, name: str) -> bool:
    """A VAE whose config sets force_upcast false (the fp16-fix VAEs) runs in fp16, as diffusers runs it; others stay fp32."""
    return name.startswith("vae_") and getattr(model.vae.config, "force_upcast", True) is False


def components(recipe, model: LoadedModel) -> list[str]:
    """Every component of the recipe: an SD 1.x or 2.x folder has them all."""
    return recipe.component_names


def manifest_blocks(recipe, model: LoadedModel, dims: dict[str, int]) -> dict:
    """The manifest's family-specific blocks: the latent layout, the parametrization and the model's own figures."""
    return {
        "latent": {
            "channels": dims["latent_channels"], "factor": recipe.latent_factor,
            "scaling_factor": float(model.vae.config.scaling_factor),
            "shift_factor": float(getattr(model.vae.config, "shift_factor", None) or 0.0),
        },
        "parametrization": {"prediction_type": model.scheduler_config.get("prediction_type") or "epsilon"},
        "model": {
            "unet_in_channels": dims["unet_in_channels"],
            "text_hidden": dims["text_hidden"],
            "text_layers": int(model.text_encoder.config.num_hidden_layers),  # clip skip goes from 1 to this
        },
    }


def tokenizers(model: LoadedModel, folder: Path, staging: Path, dims: dict[str, int]) -> dict[str, dict]:
    """The tokenizers, keyed by the text encoder each feeds: SD 1.x has one."""
    return {"text_encoder": copy_tokenizer(model.tokenizer, folder / "tokenizer", staging, "tokenizer", dims["text_length"])}
