"""Step caching for U-Nets, the heavy side: the U-Net that also returns its deep feature, and the shallow U-Net.

DeepCache (Ma, Fang and Wang 2024, "DeepCache: Accelerating Diffusion Models for Free", arXiv 2312.00858): the deep
blocks' output changes little from one step to the next, so a step may reuse it and run only the shallow branch:
``conv_in``, the first ``depth`` layers of the first down block, then the last up block's layers that take their skip
connections, and the output head. The full U-Net's graph gains one output, the feature the shallow branch reuses (the
hidden state entering the last up block's layer ``n - depth``); the shallow U-Net is a graph of its own that takes it.
Both are exported with the same static shapes as the U-Net, and the runtime chooses per step which one runs.
"""
from __future__ import annotations

from typing import Callable

import torch

from sdfast.errors import ExportError

FEATURE = "step_cache_feature"  # the U-Net's extra output and the shallow U-Net's extra input
SHALLOW = "unet_shallow"  # the component of the shallow branch


def _layers(block) -> int:
    return len(block.resnets)


def check_depth(unet, depth: int) -> None:
    """ExportError unless ``depth`` is 0 .. the first down block's layer count, on a U-Net whose embeddings we replicate."""
    first = unet.down_blocks[0]
    if not 0 <= depth <= _layers(first):
        raise ExportError(f"--step-cache-depth {depth}: the first down block has {_layers(first)} layers (0 to {_layers(first)})")
    if _layers(unet.up_blocks[-1]) != _layers(first) + 1:
        raise ExportError("--step-cache: this U-Net's last up block does not mirror its first down block")
    unsupported = [key for key in ("class_embed_type", "addition_embed_type") if unet.config.get(key) not in (None, "text_time")]
    if unsupported or unet.config.get("center_input_sample"):
        raise ExportError(f"--step-cache: this U-Net's {', '.join(unsupported) or 'center_input_sample'} is not supported")


def feature_shape(unet, depth: int, latent_height: int, latent_width: int) -> tuple[int, int, int]:
    """(C, h, w) of the cached feature: what enters the last up block's layer ``n - depth`` (layers 0 .. n)."""
    up = unet.up_blocks
    layer = _layers(up[-1]) - 2 - depth  # the last layer the full U-Net runs before the shallow branch takes over
    channels = up[-1].resnets[layer].out_channels if layer >= 0 else up[-2].resnets[-1].out_channels
    return int(channels), latent_height, latent_width


def feature_dims(unet, depth: int | None, latent_height: int, latent_width: int) -> list[tuple[str, tuple[int, int, int]]]:
    """The recipe's ``step_cache_feature`` list: one tensor with step caching, none without."""
    if depth is None:
        return []
    check_depth(unet, depth)
    return [(FEATURE, feature_shape(unet, depth, latent_height, latent_width))]


def _feature_module(unet, depth: int):
    """The module whose output is the cached feature: the last up block's layer n - depth - 1, or the up block before."""
    up = unet.up_blocks
    layer = _layers(up[-1]) - 2 - depth
    if layer < 0:
        return up[-2]
    attentions = getattr(up[-1], "attentions", None)
    return attentions[layer] if attentions else up[-1].resnets[layer]


def with_feature(unet, depth: int | None, run: Callable[[], torch.Tensor]):
    """``run()``'s noise prediction; with step caching (``depth`` not None), (noise, the feature it computed on the way)."""
    if depth is None:
        return run()
    captured = []
    hook = _feature_module(unet, depth).register_forward_hook(
        lambda _module, _inputs, output: captured.append(output[0] if isinstance(output, tuple) else output))
    try:
        noise = run()
    finally:
        hook.remove()
    return noise, captured[0]


def _embeddings(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs):
    """The time embedding and the text states as UNet2DConditionModel.forward makes them (SDXL's text_time included)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    augmented = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    emb = emb + augmented if augmented is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    return emb, states


def _layer(block, index: int, hidden, emb, states):
    """One resnet of a U-Net block, then its transformer where the block has one (CrossAttn{Down,Up}Block2D's order)."""
    hidden = block.resnets[index](hidden, emb)
    attentions = getattr(block, "attentions", None)
    if attentions:
        hidden = attentions[index](hidden, encoder_hidden_states=states, return_dict=False)[0]
    return hidden


def shallow_forward(unet, depth: int, sample, timestep, encoder_hidden_states, added_cond_kwargs, feature):
    """The U-Net's output with everything below the shallow branch replaced by ``feature`` (DeepCache's cached step)."""
    emb, states = _embeddings(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
    hidden = unet.conv_in(sample)  # hidden: [B, C0, h, w]
    skips = [hidden]
    first = unet.down_blocks[0]
    for index in range(depth):
        hidden = _layer(first, index, hidden, emb, states)
        skips.append(hidden)
    hidden, last = feature, unet.up_blocks[-1]
    for index in range(_layers(last) - 1 - depth, _layers(last)):  # each takes one skip connection, the deepest first
        hidden = torch.cat([hidden, skips.pop()], dim=1)
        hidden = _layer(last, index, hidden, emb, states)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


class ShallowUNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, [text_embeds, time_ids,] step_cache_feature) -> noise_pred: the cached step.

    The family's LoadedModel carries ``step_cache_depth`` (set by the export from --step-cache-depth).
    """

    def __init__(self, model):
        super().__init__()
        self.unet, self.depth = model.unet, int(model.step_cache_depth)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        *added, feature = rest  # SDXL: text_embeds, time_ids
        added_cond_kwargs = {"text_embeds": added[0], "time_ids": added[1]} if added else None
        return shallow_forward(self.unet, self.depth, sample, timestep, encoder_hidden_states, added_cond_kwargs, feature)
