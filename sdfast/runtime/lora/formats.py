"""LoRA files as low-rank updates of named model weights: kohya / A1111 (LoRA and LoCon) and diffusers / PEFT.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021): W' = W + multiplier x (alpha / rank) x up @ down.
Targets are named as the engine's parameter map names them: the pipeline component, then the diffusers (or
transformers) module path, then ``.weight`` (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from sdfast.errors import RequestError
from sdfast.runtime.lora.sgm_names import sgm_to_diffusers

# kohya-ss sd-scripts' module prefixes (SD 1.x/2.x: one text encoder; SDXL: te1 is CLIP ViT-L, te2 is OpenCLIP bigG)
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"))
KOHYA_PARTS = {"lora_up.weight": "up", "lora_down.weight": "down", "alpha": "alpha"}
# diffusers' and PEFT's suffixes, newest first
DIFFUSERS_PARTS = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                   (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
                   ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processors: ...processor.to_q_lora.down
                   (".alpha", "alpha"))
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# LyCORIS and other adapter types, recognised so they are refused by name rather than as an unknown format
OTHER_ADAPTERS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lora_mid.weight": "LoCon with Tucker decomposition (lora_mid)",
                  "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "a full weight difference (LyCORIS 'full')",
                  "oft_blocks": "OFT", "ia3": "IA3"}
_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


@dataclass(frozen=True)
class LowRankUpdate:
    """One weight's update: up [O, r(, 1, 1)] @ down [r, I(, kh, kw)] x alpha / r."""

    up: np.ndarray
    down: np.ndarray
    alpha: float | None  # None: scale 1 (kohya and diffusers save alpha = rank when none was set)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def factors(self, multiplier: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(up [O, r] x multiplier x alpha / r, down [r, I * kh * kw]): the update is their product."""
        up = self.up.reshape(self.up.shape[0], -1) * np.float32(multiplier * self.scale)
        return up, self.down.reshape(self.rank, -1)

    def delta(self, shape: tuple[int, ...], multiplier: float = 1.0) -> np.ndarray:
        """The update in the weight's own [O, I(, kh, kw)] shape, float32."""
        up, down = self.factors(multiplier)
        return (up @ down).reshape(shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the update has the weight's shape: [O, r] @ [r, I...] with the up matrix 1x1 (a Linear LoRA on a
        1x1 convolution, or the reverse, fits too: the elements line up)."""
        if self.up.ndim < 2 or self.down.ndim < 2:
            return False
        up_spatial = int(np.prod(self.up.shape[2:], dtype=np.int64)) if self.up.ndim > 2 else 1
        return (up_spatial == 1 and self.up.shape[1] == self.rank and self.up.shape[0] == shape[0]
                and int(np.prod(self.down.shape[1:], dtype=np.int64)) == int(np.prod(shape[1:], dtype=np.int64)))


def parse_lora(name: str, tensors: dict[str, np.ndarray], targets: dict[str, tuple[int, ...]],
               metadata: dict[str, str] | None = None) -> dict[str, LowRankUpdate]:
    """The file's updates keyed by target weight; a RequestError for another format or another base model.

    ``targets``: every weight the engine can patch, with its shape (the parameter maps of its components).
    ``metadata``: the safetensors header's; diffusers keeps PEFT's lora_alpha there (``lora_adapter_metadata``).
    """
    for key in tensors:
        for marker, kind in OTHER_ADAPTERS.items():
            if key.endswith("." + marker) or f".{marker}." in key:
                raise RequestError(f"LoRA '{name}' is {kind}, which sdfast does not apply (LoRA and LoCon files only)")
    if any(key.startswith(prefix) for key in tensors for prefix, _ in KOHYA_PREFIXES):
        parts = _kohya_parts(name, tensors, targets)
    elif any(key.split(".", 1)[0] in DIFFUSERS_COMPONENTS for key in tensors):
        parts = _diffusers_parts(name, tensors, targets)
        _peft_alphas(name, parts, (metadata or {}).get("lora_adapter_metadata"))
    else:
        sample = next(iter(tensors), "(no tensors)")
        raise RequestError(f"LoRA '{name}' is of an unknown format (first key '{sample}'): sdfast reads kohya/A1111 "
                           "(lora_unet_..., lora_te_...) and diffusers/PEFT (unet...., text_encoder....) files")
    updates = {}
    for target, part in sorted(parts.items()):
        if "up" not in part or "down" not in part:
            raise RequestError(f"LoRA '{name}' is corrupt: {target} has no {'up' if 'up' not in part else 'down'} matrix")
        alpha = part.get("alpha")
        if alpha is not None and np.asarray(alpha).size != 1:
            raise RequestError(f"LoRA '{name}' is corrupt: the alpha of {target} is not one number")
        update = LowRankUpdate(part["up"], part["down"], None if alpha is None else float(np.asarray(alpha).reshape(-1)[0]))
        shape = targets[target]
        if not update.fits(shape):
            raise RequestError(f"LoRA '{name}' is for another base model: {target} is {list(shape)} in this engine, the LoRA's "
                               f"update is {list(update.up.shape)} @ {list(update.down.shape)}")
        updates[target] = update
    if not updates:
        raise RequestError(f"LoRA '{name}' has no LoRA weights")
    return updates


def _kohya_parts(name: str, tensors: dict[str, np.ndarray], targets: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """kohya keys are module paths with dots as underscores: looked up against the engine's own paths."""
    lookup = {}
    for target in targets:
        component, path = target.split(".", 1)
        lookup[(component, path.removesuffix(".weight").replace(".", "_"))] = target
    resnets = {int(m.group(1)) for t in targets if (m := re.match(r"unet\.down_blocks\.0\.resnets\.(\d+)\.", t))}
    layers_per_block = max(resnets) + 1 if resnets else 2  # the SGM blocks' numbering depends on it
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        stem, _, suffix = key.partition(".")
        kind = KOHYA_PARTS.get(suffix)
        prefix, component = next(((p, c) for p, c in KOHYA_PREFIXES if stem.startswith(p)), (None, None))
        if kind is None or prefix is None:
            raise RequestError(f"LoRA '{name}': key '{key}' is not a kohya LoRA key (lora_unet_/lora_te_ ... lora_up, lora_down, alpha)")
        path = stem[len(prefix):]
        target = lookup.get((component, path)) or lookup.get((component, path.removeprefix("text_model_")))
        if target is None and component == "unet":  # SDXL LoRAs from sd-scripts name the original (SGM) U-Net's blocks
            target = next((lookup[(component, c)] for c in sgm_to_diffusers(path, layers_per_block) if (component, c) in lookup), None)
        if target is None:
            raise RequestError(f"LoRA '{name}' is for another base model: '{stem}' has no {component} weight in this engine")
        parts.setdefault(target, {})[kind] = value
    return parts


def _diffusers_parts(name: str, tensors: dict[str, np.ndarray], targets: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        suffix, kind = next(((s, k) for s, k in DIFFUSERS_PARTS if key.endswith(s)), (None, None))
        if suffix is None:
            raise RequestError(f"LoRA '{name}': key '{key}' is not a diffusers/PEFT LoRA key (lora_A, lora_B, lora.up, lora.down, alpha)")
        module = key[: -len(suffix)]
        module = re.sub(r"\.processor\.(to_[qkv]|to_out)$", lambda m: "." + _PROCESSOR_NAMES[m.group(1)], module)
        target = module + ".weight"
        if target not in targets:  # transformers 5's CLIPTextModel has no text_model level; older files name it
            target = target.replace(".text_model.", ".", 1)
        if target not in targets:
            raise RequestError(f"LoRA '{name}' is for another base model: '{module}' has no weight in this engine")
        parts.setdefault(target, {})[kind] = value
    return parts


def _peft_alphas(name: str, parts: dict[str, dict], adapter_metadata: str | None) -> None:
    """Give each update without an ``.alpha`` tensor PEFT's lora_alpha (or its alpha_pattern entry) from the metadata
    diffusers saves; rsLoRA's alpha / sqrt(r) is kept as an equivalent alpha. Without metadata the scale stays 1."""
    if not adapter_metadata:
        return
    try:
        config = json.loads(adapter_metadata)
    except ValueError:
        raise RequestError(f"LoRA '{name}': its lora_adapter_metadata is not JSON") from None
    for target, part in parts.items():
        component, module = target.removesuffix(".weight").split(".", 1)
        if config.get(f"{component}.use_dora"):
            raise RequestError(f"LoRA '{name}' is DoRA, which sdfast does not apply (LoRA and LoCon files only)")
        if "alpha" in part or f"{component}.lora_alpha" not in config or "down" not in part:
            continue
        alpha = float(config[f"{component}.lora_alpha"])
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's own matching of pattern keys
                alpha = float(value)
        rank = part["down"].shape[0]
        part["alpha"] = np.float32(alpha * math.sqrt(rank) if config.get(f"{component}.use_rslora") else alpha)
