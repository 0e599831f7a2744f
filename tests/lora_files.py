"""Small random LoRA files of the formats users download, made from a diffusers pipeline's own modules."""
from __future__ import annotations

from pathlib import Path

import numpy as np

UNET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")  # kohya's LoRA
LOCON_MODULES = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")  # kohya's LoCon adds these
TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(module, names: tuple[str, ...]):
    import torch

    for path, layer in module.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and any(path == n or path.endswith("." + n) for n in names):
            yield path, tuple(layer.weight.shape)


def kohya_lora(pipe, path: Path, rank: int = 4, seed: int = 0, std: float = 0.15, locon: bool = True,
               text_model_prefix: str = "text_model_", text_encoders=(("lora_te_", "text_encoder"),), dtype=np.float16) -> Path:
    """A kohya-ss / A1111 LoRA (LoCon when ``locon``): lora_unet_<path with underscores>.lora_down/lora_up/alpha.

    ``text_model_prefix``: kohya names CLIP's modules as transformers 4 did (text_model.encoder...).
    """
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    groups = [("lora_unet_", "", pipe.unet, UNET_MODULES + (LOCON_MODULES if locon else ()))]
    groups += [(prefix, text_model_prefix, getattr(pipe, attribute), TEXT_MODULES) for prefix, attribute in text_encoders]
    for prefix, inner, module, names in groups:
        for module_path, shape in _targets(module, names):
            stem = prefix + inner + module_path.replace(".", "_")
            kernel = shape[2:]
            tensors[f"{stem}.lora_down.weight"] = rng.normal(0, std, (rank, shape[1], *kernel)).astype(dtype)
            tensors[f"{stem}.lora_up.weight"] = rng.normal(0, std, (shape[0], rank, *((1, 1) if kernel else ()))).astype(dtype)
            tensors[f"{stem}.alpha"] = np.asarray(rank / 2, dtype=dtype)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def peft_lora(pipe, folder: Path, name: str, rank: int = 4, seed: int = 0, alphas=(8, 2)) -> Path:
    """A diffusers / PEFT LoRA as diffusers saves it (save_lora_weights, lora_A/lora_B keys, lora_alpha in the metadata),
    its weights random (PEFT's init_lora_weights=False), on the U-Net and the text encoder."""
    import copy

    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alphas[0], target_modules=list(UNET_MODULES + ("conv1", "conv2")), init_lora_weights=False))
    text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alphas[1], target_modules=list(TEXT_MODULES), init_lora_weights=False))
    with torch.no_grad():  # PEFT's random init is large for a toy model: scaled down so the image changes, not saturates
        for module in (unet, text_encoder):
            for key, parameter in module.named_parameters():
                if "lora_B" in key:
                    parameter.mul_(0.5)
    type(pipe).save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict(), weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"
