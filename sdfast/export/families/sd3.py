"""Stable Diffusion 3 and 3.5 on the export side: CLIP-L and OpenCLIP-bigG with projections, the MMDiT transformer and the
16-channel VAE; their wrappers, sample inputs, dimensions and manifest blocks (recipe: export/sd3.toml).

The conditioning follows diffusers' StableDiffusion3Pipeline.encode_prompt (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", sec. 5.2): each CLIP's penultimate layer, side by side, zero-padded
to T5's width and followed by T5's tokens; the two pooled projections side by side. T5-XXL is exported only when
asked (--t5 fp32, fp16 or int8); without it the runtime puts zeros in its place, as diffusers does with
text_encoder_3=None.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdfast.errors import ConfigError
from sdfast.export.families import sd15
from sdfast.export.families.sd15 import VaeDecoder, VaeEncoder
from sdfast.export.families.sdxl import ProjectedTextEncoder
from sdfast.export.recipe import ComponentRecipe
from sdfast.export.source import load_or_refuse, read_model_index, read_scheduler_config
from sdfast.export.staging import copy_tokenizer
from sdfast.export.tiny_vae import TinyVaeDecoder


@dataclass
class LoadedModel:
    """The PyTorch components of an SD3 folder, fp32, in eval mode; T5 only when the export asks for it."""

    folder: Path
    text_encoder: object
    text_encoder_2: object
    transformer: object
    vae: object
    tokenizer: object
    tokenizer_2: object
    scheduler_config: dict
    has_t5: bool  # the folder holds T5-XXL
    t5: str = "none"  # --t5: none, fp32, fp16 or int8
    text_encoder_3: object | None = None
    tokenizer_3: object | None = None


def load(folder: Path, request=None) -> LoadedModel:
    """The folder's CLIP encoders, transformer and VAE in fp32, and T5 when ``request.t5`` asks for it; the
    (flow-matching) scheduler config is read first."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    scheduler_config = read_scheduler_config(folder, flow_matching=True)
    index = read_model_index(folder)
    has_t5 = (folder / "text_encoder_3").is_dir() and (index.get("text_encoder_3") or [None])[0] is not None
    t5 = (getattr(request, "t5", None) or "none") if request is not None else "none"
    if t5 != "none" and not has_t5:
        raise ConfigError(f"--t5 {t5}: '{folder}' has no T5 encoder (text_encoder_3); export with --t5 none")
    text_encoder_3 = tokenizer_3 = None
    if t5 != "none":
        text_encoder_3 = load_or_refuse(folder, "text_encoder_3", lambda: T5EncoderModel.from_pretrained(folder / "text_encoder_3", torch_dtype=torch.float32))
        tokenizer_3 = load_or_refuse(folder, "tokenizer_3", lambda: AutoTokenizer.from_pretrained(folder / "tokenizer_3"))
        text_encoder_3.eval().requires_grad_(False)

    def clip(name: str):
        return load_or_refuse(folder, name, lambda: CLIPTextModelWithProjection.from_pretrained(folder / name, torch_dtype=torch.float32))

    text_encoder, text_encoder_2 = clip("text_encoder"), clip("text_encoder_2")
    tokenizer = load_or_refuse(folder, "tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    tokenizer_2 = load_or_refuse(folder, "tokenizer_2", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
    transformer = load_or_refuse(folder, "transformer", lambda: SD3Transformer2DModel.from_pretrained(
        folder / "transformer", torch_dtype=torch.float32))
    vae = load_or_refuse(folder, "vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32))
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval().requires_grad_(False)
    return LoadedModel(folder, text_encoder, text_encoder_2, transformer, vae, tokenizer, tokenizer_2, scheduler_config, has_t5,
                       t5, text_encoder_3, tokenizer_3)


def components(recipe, model: LoadedModel) -> list[str]:
    """The recipe's components; T5 (text_encoder_3) only when the export asks for it."""
    return [name for name in recipe.component_names if name != "text_encoder_3" or model.t5 != "none"]


def component_precision(model: LoadedModel, name: str, asked: str) -> str:
    """T5 in the precision --t5 names (fp32, fp16 or int8), whatever the rest of the export's; the others as asked."""
    return model.t5 if name == "text_encoder_3" else asked


class TextEncoder(ProjectedTextEncoder):
    """CLIP-L with projection: (input_ids, clip_skip) -> (prompt_embeds [B, 77, 768], text_embeds [B, 768])."""

    def __init__(self, model: LoadedModel):
        super().__init__(model.text_encoder)


class TextEncoderG(ProjectedTextEncoder):
    """OpenCLIP-bigG with projection: (input_ids, clip_skip) -> (prompt_embeds [B, 77, 1280], text_embeds [B, 1280])."""

    def __init__(self, model: LoadedModel):
        super().__init__(model.text_encoder_2)


class T5Encoder(torch.nn.Module):
    """T5-XXL's encoder: input_ids [1, 256] ("</s>" after the prompt, then padding) -> prompt_embeds [1, 256, 4096], the last
    hidden state (no attention mask: StableDiffusion3Pipeline encodes the padding too)."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.encoder = model.text_encoder_3

    def forward(self, input_ids):
        return self.encoder(input_ids, return_dict=False)[0]


# Queries per attention slice. SD3.5 Medium at 1024x1024 attends over 4096 + 333 tokens: whole, each score matrix
# is 2 x 24 x 4429^2 floats (3.5 GiB), and an unfused graph holds two (scores, probabilities). In slices of 512
# queries (softmax is per query row, so the result is the same) each is 0.4 GiB.
QUERY_SLICE = 512


def _sliced(attention, size: int):
    """scaled_dot_product_attention over ``size`` queries at a time: the same rows, a ninth of the score memory."""

    def sliced(query, key, value, attn_mask=None, *args, **kwargs):
        if query.shape[-2] <= size or attn_mask is not None:  # (a mask would need slicing too; SD3's attention has none)
            return attention(query, key, value, attn_mask, *args, **kwargs)
        return torch.cat([attention(rows, key, value, None, *args, **kwargs) for rows in query.split(size, dim=-2)], dim=-2)

    return sliced


class Transformer(torch.nn.Module):
    """(sample [B, 16, h, w], timestep [B] = t x 1000, encoder_hidden_states [B, 77 + T5 tokens, 4096], pooled_projections
    [B, 2048], layer_keep [L]) -> noise_pred [B, 16, h, w], the predicted velocity.

    SD3Transformer2DModel.forward with its ``skip_layers`` as data: block i's output replaces its input only where
    layer_keep[i] is 1, so one graph serves both the plain calls (all ones) and skip-layer guidance's (zeros at the
    skipped blocks; Esser et al.'s SD3.5 recipe, diffusers' skip_guidance_layers). Attention runs in query slices
    (QUERY_SLICE). tests/test_sd3.py checks it against the stock forward with and without skip_layers.
    """

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.transformer = model.transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, layer_keep):
        stock = torch.nn.functional.scaled_dot_product_attention  # diffusers' SD3 processors look it up at each call
        torch.nn.functional.scaled_dot_product_attention = _sliced(stock, QUERY_SLICE)
        try:
            return self._forward(sample, timestep, encoder_hidden_states, pooled_projections, layer_keep)
        finally:
            torch.nn.functional.scaled_dot_product_attention = stock

    def _forward(self, sample, timestep, encoder_hidden_states, pooled_projections, layer_keep):
        net = self.transformer
        height, width = sample.shape[-2:]
        hidden = net.pos_embed(sample)  # [B, h/p x w/p, D]: patches with their positional embeddings
        temb = net.time_text_embed(timestep, pooled_projections)  # [B, D]
        context = net.context_embedder(encoder_hidden_states)  # [B, T, D]
        for index, block in enumerate(net.transformer_blocks):
            new_context, new_hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            keep = layer_keep[index] > 0.5
            hidden = torch.where(keep, new_hidden, hidden)
            if new_context is not None:  # the last block updates only the image tokens (context_pre_only)
                context = torch.where(keep, new_context, context)
        hidden = net.proj_out(net.norm_out(hidden, temb))  # [B, h/p x w/p, p x p x C]
        patch, channels = net.config.patch_size, net.out_channels
        hidden = hidden.reshape(hidden.shape[0], height // patch, width // patch, patch, patch, channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(hidden.shape[0], channels, height, width)


fp16_safe = sd15.fp16_safe


def fp32_attention_scores(model: LoadedModel, name: str) -> str | None:
    return None  # the MMDiT's attention normalizes q and k (qk_norm) in SD3.5; SD3's fp16 is diffusers' own default


WRAPPERS = {"text_encoder": TextEncoder, "text_encoder_2": TextEncoderG, "text_encoder_3": T5Encoder, "transformer": Transformer,
            "vae_decoder": VaeDecoder, "vae_decoder_tiny": TinyVaeDecoder, "vae_decoder_tile": VaeDecoder, "vae_encoder_tile": VaeEncoder, "vae_encoder": VaeEncoder}

# The PyTorch modules each component is the last to need: the export frees them once its parity outputs are computed.
RELEASES = {"text_encoder": ("text_encoder",), "text_encoder_2": ("text_encoder_2",), "text_encoder_3": ("text_encoder_3",),
            "transformer": ("transformer",),
            "vae_encoder": ("vae",)}


def sample_inputs(recipe: ComponentRecipe, model: LoadedModel, purpose: str = "trace", seed: int = 1234) -> dict[str, np.ndarray]:
    """Seeded inputs in each input's realistic range (flow timesteps in (0, 1000], VAE latents unscaled and unshifted)."""
    rng = np.random.default_rng(seed)
    config = model.vae.config
    inputs = {}
    for tensor in recipe.inputs:
        shape = tensor.concrete_shape(recipe.dynamic, purpose)
        if tensor.name == "input_ids":
            vocab = int(getattr(model, recipe.name).config.vocab_size)  # this encoder's (the other may be freed already)
            value = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif tensor.name == "clip_skip":
            value = np.full(shape, 2 if purpose == "trace" else 1, dtype=np.int64)
        elif tensor.name == "timestep":
            value = np.linspace(1000, 30, shape[0]).astype(np.float32)
        elif tensor.name == "layer_keep":  # every block kept; traced with one skipped, so the graph cannot drop the mask
            value = np.ones(shape, dtype=np.float32)
            value[0] = 0.0 if purpose == "trace" else 1.0
        elif tensor.name == "image":
            value = rng.uniform(-1, 1, size=shape).astype(np.float32)
        elif tensor.name == "latent":
            value = (rng.standard_normal(shape) / float(config.scaling_factor) + float(config.shift_factor or 0.0)).astype(np.float32)
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        inputs[tensor.name] = value
    return inputs


def dimensions(request, recipe, model: LoadedModel) -> dict[str, int]:
    factor, config = recipe.latent_factor, model.transformer.config
    if factor * int(config.patch_size) != int(recipe.data["size_multiple"]):
        raise ConfigError(f"the transformer's patch size {config.patch_size} is not the sd3 recipe's (size_multiple / latent_factor)")
    native = int(config.sample_size) * factor
    height, width = request.height or native, request.width or native
    text_length = min(int(model.tokenizer.model_max_length), int(model.text_encoder.config.max_position_embeddings))
    pooled = [int(e.config.projection_dim) for e in (model.text_encoder, model.text_encoder_2)]
    hidden = [int(e.config.hidden_size) for e in (model.text_encoder, model.text_encoder_2)]
    if sum(pooled) != int(config.pooled_projection_dim) or sum(hidden) > int(config.joint_attention_dim):
        raise ConfigError("the text encoders do not fit the transformer: pooled widths "
                          f"{'+'.join(map(str, pooled))} vs pooled_projection_dim {config.pooled_projection_dim}, hidden widths "
                          f"{'+'.join(map(str, hidden))} vs joint_attention_dim {config.joint_attention_dim}")
    t5_length = int(recipe.defaults["t5_length"])
    return {
        "height": height, "width": width, "batch": request.batch,
        "unet_batch": request.batch * (2 if request.guidance else 1),
        "latent_height": height // factor, "latent_width": width // factor,
        "latent_channels": int(model.vae.config.latent_channels), "unet_in_channels": int(config.in_channels),
        "text_length": text_length, "text_hidden_1": hidden[0], "text_hidden_2": hidden[1],
        "pooled_1": pooled[0], "pooled_2": pooled[1], "pooled_dim": sum(pooled),
        "joint_dim": int(config.joint_attention_dim), "t5_length": t5_length, "context_tokens": text_length + t5_length,
        "transformer_layers": int(config.num_layers),
        "max_text_chunks": 1,
    }


def manifest_blocks(recipe, model: LoadedModel, dims: dict[str, int]) -> dict:
    """The 16-channel latent layout (scaling and shift), flow prediction, and what the runtime's conditioning needs."""
    layers = [int(e.config.num_hidden_layers) for e in (model.text_encoder, model.text_encoder_2)]
    return {
        "latent": {
            "channels": dims["latent_channels"], "factor": recipe.latent_factor,
            "scaling_factor": float(model.vae.config.scaling_factor),
            "shift_factor": float(getattr(model.vae.config, "shift_factor", None) or 0.0),
        },
        "parametrization": {"prediction_type": "flow_prediction"},
        "model": {
            "unet_in_channels": dims["unet_in_channels"],
            "text_hidden": dims["joint_dim"],
            "text_layers": min(layers) - 1,  # clip skip k takes hidden_states[-(k + 1)]: at most the first layer's output
            "patch_size": int(model.transformer.config.patch_size),
            "t5": None if model.t5 == "none" else model.t5,  # None: T5's tokens are zeros, as diffusers without text_encoder_3
            "t5_length": dims["t5_length"],
            "folder_has_t5": model.has_t5,
        },
    }


def tokenizers(model: LoadedModel, folder: Path, staging: Path, dims: dict[str, int]) -> dict[str, dict]:
    """The two CLIP tokenizers, keyed by the text encoder each feeds: CLIP-L's pads with its EOS, OpenCLIP's with "!"."""
    entries = {
        "text_encoder": copy_tokenizer(model.tokenizer, folder / "tokenizer", staging, "tokenizer", dims["text_length"]),
        "text_encoder_2": copy_tokenizer(model.tokenizer_2, folder / "tokenizer_2", staging, "tokenizer_2", dims["text_length"]),
    }
    if model.t5 != "none":  # T5's SentencePiece vocabulary as tokenizer.json: "</s>" after the prompt, "<pad>" after that
        entries["text_encoder_3"] = copy_tokenizer(model.tokenizer_3, folder / "tokenizer_3", staging, "tokenizer_3", dims["t5_length"], t5=True)
    return entries
