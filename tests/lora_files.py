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


def sgm_name(path: str, layers_per_block: int, attention_up_blocks: set[int]) -> str:
    """The original (SGM) U-Net's name of a diffusers module path, as kohya's SDXL LoRAs use it (dots kept)."""
    import re

    resnet_parts = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    step = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", path):
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.0.{resnet_parts[m[3]]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{1 + int(m[1]) * step + layers_per_block}.0.op"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", path):
        return f"middle_block.{2 * int(m[1])}.{resnet_parts[m[2]]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", path):
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.0.{resnet_parts[m[3]]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        return f"output_blocks.{int(m[1]) * step + layers_per_block}.{2 if int(m[1]) in attention_up_blocks else 1}.conv"
    raise ValueError(path)


def kohya_sdxl_lora(pipe, path: Path, rank: int = 4, seed: int = 0, std: float = 0.15, locon: bool = True) -> Path:
    """A kohya-ss SDXL LoRA: U-Net modules by their original (SGM) names, and the first text encoder (lora_te1_).

    Not the second (lora_te2_): diffusers 0.42 with transformers 5 cannot load kohya's te2 keys (it looks them up
    without CLIPTextModelWithProjection's text_model level), so the parity reference could not run; the tests check
    lora_te2_ against the same update in diffusers' own format instead."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    config = pipe.unet.config
    attention_up = {i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
    tensors = {}
    groups = [("lora_unet_", pipe.unet, UNET_MODULES + (LOCON_MODULES if locon else ()), True),
              ("lora_te1_text_model_", pipe.text_encoder, TEXT_MODULES, False)]
    for prefix, module, names, sgm in groups:
        for module_path, shape in _targets(module, names):
            name = sgm_name(module_path, config.layers_per_block, attention_up) if sgm else module_path
            stem = prefix + name.replace(".", "_")
            kernel = shape[2:]
            tensors[f"{stem}.lora_down.weight"] = rng.normal(0, std, (rank, shape[1], *kernel)).astype(np.float16)
            tensors[f"{stem}.lora_up.weight"] = rng.normal(0, std, (shape[0], rank, *((1, 1) if kernel else ()))).astype(np.float16)
            tensors[f"{stem}.alpha"] = np.asarray(rank / 2, dtype=np.float16)
    save_file(tensors, str(path))
    return path


def peft_text_encoder_2_lora(pipe, folder: Path, name: str, rank: int = 4, alpha: int = 8, seed: int = 0) -> Path:
    """SDXL's second text encoder's LoRA as diffusers saves a PEFT adapter (text_encoder_2.text_model..., lora_A/lora_B)."""
    import copy

    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    encoder = copy.deepcopy(pipe.text_encoder_2)
    encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TEXT_MODULES), init_lora_weights=False))
    with torch.no_grad():
        for key, parameter in encoder.named_parameters():
            if "lora_B" in key:
                parameter.mul_(0.5)
    type(pipe).save_lora_weights(folder, text_encoder_2_lora_layers=get_peft_model_state_dict(encoder),
                                 text_encoder_2_lora_adapter_metadata=encoder.peft_config["default"].to_dict(),
                                 weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"


def as_kohya_text_encoder_2(peft_file: Path, path: Path, alpha: float) -> Path:
    """The same update in kohya's naming: lora_te2_<path with underscores>.lora_down / lora_up / alpha."""
    from safetensors.numpy import load_file, save_file

    tensors = {}
    for key, value in load_file(str(peft_file)).items():
        module, _, part = key.removeprefix("text_encoder_2.").rpartition(".lora_")
        stem = "lora_te2_" + module.replace(".", "_")
        tensors[f"{stem}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        tensors[f"{stem}.alpha"] = np.asarray(alpha, dtype=np.float32)
    save_file(tensors, str(path))
    return path
