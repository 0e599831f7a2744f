"""The VAE's calls for a pipeline: encode images to the denoiser's latents, decode latents to images, with the full
decoder, the tiny one (TAESD) or in blended tiles (sdfast.runtime.tiled_vae)."""
from __future__ import annotations

import numpy as np

from sdfast.runtime.device_loop import check_finite
from sdfast.runtime.request_check import TINY_VAE
from sdfast.runtime.tiled_vae import tiled_decode, tiled_encode


def encode_images(pipeline, image: np.ndarray, tiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[n, 3, H, W] in [-1, 1], n up to the encoder's batch -> the VAE posterior (mean, std), each [n, C, h, w], already
    in the denoiser's latent space (one call: the rows past n repeat the first image); ``tiled``: the tile graph."""
    n = len(image)
    if tiled:
        mean, std = tiled_encode(pipeline.engines["vae_encoder_tile"], image)
    else:
        rows = pipeline.engines["vae_encoder"].info.input("image").shape[0]
        padded = np.concatenate([image, np.repeat(image[:1], rows - n, axis=0)])
        mean, std = pipeline.engines["vae_encoder"].run({"image": padded})
    layout = pipeline.family.latent
    return layout.from_vae(check_finite("VAE encoder", mean[:n])), layout.from_vae(check_finite("VAE encoder", std[:n]), centred=False)


def decode_latents(pipeline, latents: np.ndarray, decoder: str = "full", tiled: bool = False) -> np.ndarray:
    """Denoiser latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1]. ``decoder`` 'tiny': the tiny VAE (TAESD), fed
    the latents as they are (its graph scales them); ``tiled``: the full decoder's tile graph, seams blended."""
    if decoder == "tiny":
        (images,) = pipeline.engines[TINY_VAE].run({"latents": latents})
        return check_finite("tiny VAE decoder", images)
    unscaled = pipeline.family.latent.to_vae(latents)
    if tiled:
        return check_finite("VAE decoder", tiled_decode(pipeline.engines["vae_decoder_tile"], unscaled))
    (images,) = pipeline.engines["vae_decoder"].run({"latent": unscaled})
    return check_finite("VAE decoder", images)
