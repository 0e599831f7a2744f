"""The PyTorch modules that become the engine's ONNX files, one per component, and their sample inputs."""
from __future__ import annotations

import numpy as np
import torch

from sdfast.export.recipe import ComponentRecipe
from sdfast.export.source import LoadedModel


class TextEncoder(torch.nn.Module):
    """input_ids [B, 77] -> last_hidden_state [B, 77, D] (after the final layer norm, as diffusers uses it)."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.text_encoder = model.text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


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


def sample_inputs(recipe: ComponentRecipe, model: LoadedModel, seed: int = 1234) -> dict[str, np.ndarray]:
    """Seeded inputs in each input's realistic range, used for tracing and for the parity check."""
    rng = np.random.default_rng(seed)
    scaling = float(model.vae.config.scaling_factor)
    inputs = {}
    for tensor in recipe.inputs:
        if tensor.name == "input_ids":
            vocab = int(model.text_encoder.config.vocab_size)
            value = rng.integers(0, vocab, size=tensor.shape, dtype=np.int64)
        elif tensor.name == "timestep":
            value = np.linspace(999, 1, tensor.shape[0]).astype(np.float32)
        elif tensor.name == "image":
            value = rng.uniform(-1, 1, size=tensor.shape).astype(np.float32)
        elif tensor.name == "latent":
            value = (rng.standard_normal(tensor.shape) / scaling).astype(np.float32)
        else:
            value = rng.standard_normal(tensor.shape).astype(np.float32)
        inputs[tensor.name] = value
    return inputs
