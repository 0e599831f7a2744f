"""``sdfast export --lora FILE[:SCALE]``: LoRAs merged into the PyTorch weights before the export.

The files are read and their deltas computed by the runtime's own code (sdfast.runtime.lora), so an engine with a
LoRA fused at export and one patched at run time hold the same weights.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from sdfast.errors import ConfigError


def parse_lora_argument(text: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE`` (scale 1 when none is given)."""
    path, _, scale = text.rpartition(":")
    if path and scale:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(text), 1.0


def check_lora_files(loras: tuple[tuple[Path, float], ...]) -> None:
    """Refuse, before any model loads, LoRA files that are missing or are not .safetensors, and absurd scales."""
    from sdfast.runtime.lora.prompt_tags import MAX_WEIGHT

    for path, scale in loras:
        if not Path(path).is_file():
            raise ConfigError(f"--lora '{path}': no such file")
        if Path(path).suffix != ".safetensors":
            raise ConfigError(f"--lora '{path}': only .safetensors LoRA files are read (a .pt/.ckpt file would need pickle)")
        if not np.isfinite(scale) or abs(scale) > MAX_WEIGHT:
            raise ConfigError(f"--lora '{path}': scale {scale} is outside -{MAX_WEIGHT:g} .. {MAX_WEIGHT:g}")


def fuse_loras(model, loras: tuple[tuple[Path, float], ...], progress: Callable[[str], None]) -> list[dict]:
    """Add each LoRA's delta x scale to the family's loaded PyTorch weights; returns the manifest's record of each."""
    import torch

    from sdfast.export.parameter_map import lora_weights, owners_of
    from sdfast.runtime.lora.formats import parse_lora
    from sdfast.runtime.lora.library import MAX_LORA_BYTES, a1111_short_hash
    from sdfast.runtime.lora.safetensors_file import read_tensors
    from sdfast.runtime.manifest import sha256_file

    weights = lora_weights(owners_of(model))
    shapes = {name: tuple(weight.shape) for name, weight in weights.items()}
    records = []
    for path, scale in loras:
        tensors, metadata = read_tensors(Path(path), MAX_LORA_BYTES)
        updates = parse_lora(Path(path).stem, tensors, shapes, metadata)
        with torch.no_grad():
            for target, update in updates.items():
                weights[target].add_(torch.from_numpy(update.delta(shapes[target], scale)))
        records.append({"name": Path(path).stem, "file": Path(path).name, "sha256": sha256_file(Path(path)),
                        "a1111_hash": a1111_short_hash(Path(path)), "scale": scale, "weights": len(updates)})
        progress(f"LoRA {Path(path).name} fused at {scale:g} into {len(updates)} weights")
    return records


def fused_fingerprint(fingerprint: str, records: list[dict]) -> str:
    """The weights' fingerprint with the fused LoRAs and scales in it: another LoRA or scale is another model hash."""
    if not records:
        return fingerprint
    text = json.dumps([fingerprint, [(r["sha256"], r["scale"]) for r in records]])
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
