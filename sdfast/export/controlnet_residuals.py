"""The ControlNet residuals a U-Net (or a ControlNet) has at one latent size: their names and shapes, from its blocks.

A ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models") mirrors the U-Net's
encoder and returns one residual per skip connection (conv_in's output, each resnet's, each downsampler's) and one
for the mid block; the U-Net adds them where diffusers' down_block_additional_residuals and
mid_block_additional_residual go. Both sides walk the same blocks, so a mismatch is seen before anything is exported.
"""
from __future__ import annotations


def residual_shapes(model, latent_height: int, latent_width: int) -> list[tuple[str, tuple[int, int, int]]]:
    """[(name, (C, h, w)), ...]: down_block_residual_0 .. _{n-1}, then mid_block_residual, for a U-Net or ControlNetModel."""
    height, width = latent_height, latent_width
    shapes = [(int(model.conv_in.out_channels), height, width)]
    for block in model.down_blocks:
        for resnet in block.resnets:
            shapes.append((int(resnet.out_channels), height, width))
        if getattr(block, "downsamplers", None):
            height, width = (height + 1) // 2, (width + 1) // 2  # a 3x3 convolution of stride 2, padding 1
            shapes.append((int(block.downsamplers[0].out_channels), height, width))
    names = [f"down_block_residual_{index}" for index in range(len(shapes))]
    mid = (int(model.config.block_out_channels[-1]), height, width)
    return [*zip(names, shapes), ("mid_block_residual", mid)]
