"""The original (SGM / LDM) U-Net's module names, as kohya's SDXL LoRAs use them, as diffusers' module paths.

sd-scripts trains SDXL on the original U-Net (input_blocks, middle_block, output_blocks), so its LoRA keys name those
modules with dots as underscores; diffusers' UNet2DConditionModel has down_blocks, mid_block and up_blocks. Each
input block is one resnet or attention of a down block (layers_per_block of them, then the downsampler); each output
block one of an up block (layers_per_block + 1, then the upsampler). Names stay underscored on both sides.
"""
from __future__ import annotations

import re

_RESNET_PARTS = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_TOP_LEVEL = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
              "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
              "input_blocks_0_0": "conv_in", "out_2": "conv_out"}


def _resnet(prefix: str, rest: str) -> str:
    return f"{prefix}_{_RESNET_PARTS.get(rest, rest)}"


def sgm_to_diffusers(path: str, layers_per_block: int = 2) -> list[str]:
    """Candidate diffusers paths (underscored) for an SGM module path (underscored); [] when it is not one."""
    if path in _TOP_LEVEL:
        return [_TOP_LEVEL[path]]
    match = re.fullmatch(r"(input_blocks|output_blocks|middle_block)_(\d+)(?:_(\d+))?(?:_(.*))?", path)
    if match is None:
        return []
    kind, rest = match.group(1), match.group(4) or ""
    if kind == "middle_block":
        index = int(match.group(2))
        return [_resnet(f"mid_block_resnets_{index // 2}", rest)] if index % 2 == 0 else [f"mid_block_attentions_0_{rest}"]
    if match.group(3) is None:
        return []
    block, inner = int(match.group(2)), int(match.group(3))
    if kind == "input_blocks":
        down, layer = divmod(block - 1, layers_per_block + 1)
        if layer == layers_per_block:
            return [f"down_blocks_{down}_downsamplers_0_conv"]
        return [_resnet(f"down_blocks_{down}_resnets_{layer}", rest)] if inner == 0 else [f"down_blocks_{down}_attentions_{layer}_{rest}"]
    up, layer = divmod(block, layers_per_block + 1)
    if inner == 0:
        return [_resnet(f"up_blocks_{up}_resnets_{layer}", rest)]
    upsampler = f"up_blocks_{up}_upsamplers_0_conv"
    return [f"up_blocks_{up}_attentions_{layer}_{rest}", upsampler] if inner == 1 else [upsampler]
