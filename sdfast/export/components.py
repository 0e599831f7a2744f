"""The PyTorch modules that become the engine's ONNX files, one per component, and their sample inputs."""
from __future__ import annotations

import numpy as np
import torch

from sdfast.export.recipe import ComponentRecipe
from sdfast.export.source import LoadedModel


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
    """(sample [B, C, h, w], timestep [B], encoder_hidden_states [B, 77, D]) -> noise_pred [B, 4, h, w]."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.unet = model.unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


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


WRAPPERS = {"text_encoder": TextEncoder, "unet": UNet, "vae_decoder": VaeDecoder, "vae_encoder": VaeEncoder}


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
