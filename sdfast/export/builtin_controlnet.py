"""Built-in random-weight ControlNets, one per built-in base, made from the base U-Net's config as diffusers'
ControlNetModel.from_unet does, and saved as ordinary diffusers ControlNet folders under ``$SDFAST_CACHE/controlnets``.

A trained ControlNet starts from zero convolutions (its residuals are zero until trained); these re-draw them at
random, so the residuals are not zero and a ControlNet visibly changes the image: tests can fail, latency is real.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

FORMAT = 3  # bump when what a built-in ControlNet folder holds changes


@dataclass(frozen=True)
class BuiltinControlNet:
    name: str
    base: str  # the built-in model whose U-Net it mirrors
    seed: int
    conditioning_channels: tuple[int, ...] = (16, 32, 96, 256)  # the control image's encoder: 3 stride-2 convolutions, / 8


BUILTIN_CONTROLNETS = {
    "tiny-controlnet": BuiltinControlNet("tiny-controlnet", "tiny", 21, (8, 16, 16, 32)),
    "tiny-controlnet-2": BuiltinControlNet("tiny-controlnet-2", "tiny", 22, (8, 16, 16, 32)),
    "tiny-sdxl-controlnet": BuiltinControlNet("tiny-sdxl-controlnet", "tiny-sdxl", 23, (8, 16, 16, 32)),
    "tiny-sd2-controlnet": BuiltinControlNet("tiny-sd2-controlnet", "tiny-sd2", 27, (8, 16, 16, 32)),
    "sd15-controlnet": BuiltinControlNet("sd15-controlnet", "sd15", 24),
    "sd15-controlnet-2": BuiltinControlNet("sd15-controlnet-2", "sd15", 25),
    "sdxl-controlnet": BuiltinControlNet("sdxl-controlnet", "sdxl", 26),
}


def ensure_builtin_controlnet(name: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """The folder of a built-in ControlNet, built (and cached) if no up-to-date copy exists."""
    import diffusers
    import torch

    from sdfast.export.builtin import BUILTIN_MODELS, cache_root
    from sdfast.export.built_once import built_once

    spec = BUILTIN_CONTROLNETS[name]
    folder = cache_root() / "controlnets" / name
    descriptor = {"format": FORMAT, "controlnet": asdict(spec), "unet": json.loads(json.dumps(BUILTIN_MODELS[spec.base].unet)),
                  "torch": torch.__version__, "diffusers": diffusers.__version__}
    marker = folder / "sdfast_builtin.json"

    def is_current() -> bool:
        try:
            return json.loads(marker.read_text()) == json.loads(json.dumps(descriptor))
        except (OSError, ValueError):
            return False

    def build(staging: Path) -> None:
        log(f"building built-in ControlNet '{name}' for '{spec.base}' (random weights)")
        _build(spec, BUILTIN_MODELS[spec.base].unet).save_pretrained(staging, safe_serialization=True)
        (staging / "sdfast_builtin.json").write_text(json.dumps(descriptor, indent=2))  # last: the folder is complete

    return built_once(folder, is_current, build)


def _build(spec: BuiltinControlNet, unet_config: dict):
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(spec.seed)
    unet = UNet2DConditionModel(**unet_config)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=spec.conditioning_channels,
                                           load_weights_from_unet=False)
    del unet
    torch.manual_seed(spec.seed + 1)
    # the zero convolutions, drawn at random (nn.Conv2d's own initialization, times 10) so the residuals are not zero and
    # move the image as a trained ControlNet does
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]:
        conv.reset_parameters()
        with torch.no_grad():
            conv.weight.mul_(10.0)
    return controlnet.eval()
