"""``sdfast export-controlnet``: a diffusers ControlNetModel folder -> one more component of an existing engine dir.

The ControlNet is exported at the engine's size, batch and precision, checked against PyTorch like every component,
and added beside the base's files; the manifest is rewritten last, atomically, so the engine dir is never half-changed.
A ControlNet whose blocks do not mirror the engine's U-Net (another base model) or whose control image does not map
to the engine's latent size is refused before anything is exported.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from sdfast.errors import ConfigError, EngineError
from sdfast.export.engine_additions import add_to_engine

Progress = Callable[[str], None]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FAMILIES = ("sd15", "sdxl")  # the families whose U-Net takes ControlNet residuals


@dataclass(frozen=True)
class ControlNetExportRequest:
    source: str  # a diffusers ControlNetModel folder, or a built-in name (tiny-controlnet, sd15-controlnet, ...)
    engine: Path
    name: str | None = None  # None: the folder's (or built-in's) name
    force: bool = False  # replace a ControlNet of the same name


def controlnet_name(request: ControlNetExportRequest) -> str:
    """The name the ControlNet gets in the engine dir, checked: letters, digits, '_', '-', '.'; 64 at most."""
    name = request.name if request.name is not None else Path(request.source).name
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"ControlNet name '{name}' must be 1 to 64 letters, digits, '_', '-' or '.', starting with a letter or "
                          "digit (pass --name)")
    return name


def check_request(request: ControlNetExportRequest):
    """Everything refused before torch loads: the engine dir, its family and residual inputs, the name, the source path."""
    from sdfast.export.builtin_controlnet import BUILTIN_CONTROLNETS
    from sdfast.runtime.control import is_residual
    from sdfast.runtime.manifest import read_manifest

    manifest = read_manifest(request.engine)
    if manifest.family not in FAMILIES:
        raise ConfigError(f"ControlNets apply to SD 1.x, 2.x and SDXL engines; {request.engine} is of family '{manifest.family}'")
    unet = manifest.components[manifest.denoiser]
    if not any(is_residual(spec.name) for spec in unet.inputs):
        raise ConfigError(f"the U-Net of {request.engine} takes no ControlNet residuals (exported with --no-controlnet-inputs or "
                          "before sdfast had ControlNet): re-export the base model")
    name = controlnet_name(request)
    key = f"controlnet_{name}"
    if key in manifest.components and not request.force:
        raise ConfigError(f"{request.engine} already has a ControlNet '{name}'; pass --force to replace it")
    if request.source not in BUILTIN_CONTROLNETS:
        folder = Path(request.source)
        if not folder.is_dir():
            raise ConfigError(f"ControlNet '{folder}' " + ("does not exist" if not folder.exists() else "is not a folder") +
                              f" (a diffusers ControlNetModel folder, or a built-in: {', '.join(BUILTIN_CONTROLNETS)})")
        config = _read_config(folder)
        if config.get("_class_name") != "ControlNetModel":
            raise ConfigError(f"'{folder}' holds a {config.get('_class_name')}, not a diffusers ControlNetModel")
        if config.get("global_pool_conditions"):
            raise ConfigError(f"'{folder}' pools its residuals globally (global_pool_conditions, e.g. shuffle): not supported by sdfast yet")
    return manifest, name, key


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"'{folder}' has no config.json: not a diffusers ControlNetModel folder") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"'{folder}/config.json' is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{folder}/config.json' is not a JSON object")
    return config


def check_fit(controlnet, manifest, source: str) -> None:
    """ConfigError unless the ControlNet mirrors the engine's U-Net at the engine's size: same latent channels, text
    width, added conditioning, and the same residuals (channels and sizes), from a control image at the engine's size."""
    from sdfast.export.controlnet_residuals import residual_shapes
    from sdfast.runtime.control import is_residual

    config, geometry = controlnet.config, manifest.geometry
    unet = manifest.components[manifest.denoiser]
    base = f"this {manifest.family} engine's U-Net"
    text_width = int(unet.input("encoder_hidden_states").shape[2])
    checks = [
        ("latent channels", int(config.in_channels), int(geometry["latent_channels"])),
        ("cross-attention width", int(config.cross_attention_dim), text_width),
        ("added conditioning", config.addition_embed_type or "none", "text_time" if manifest.family == "sdxl" else "none"),
        ("control image channels", int(config.conditioning_channels), 3),
    ]
    for what, its, wanted in checks:
        if its != wanted:
            raise ConfigError(f"ControlNet '{source}' does not fit {base}: its {what} is {its}, the engine's {wanted} "
                              "(a ControlNet for another base model)")
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    if factor != int(manifest.latent["factor"]):
        raise ConfigError(f"ControlNet '{source}' encodes its control image down {factor}x, the engine's latents are "
                          f"{manifest.latent['factor']}x smaller than the image")
    theirs = [(name, tuple(shape)) for name, shape in residual_shapes(controlnet, int(geometry["latent_height"]), int(geometry["latent_width"]))]
    ours = [(spec.name, tuple(spec.shape[1:])) for spec in unet.inputs if is_residual(spec.name)]
    if theirs != ours:
        mismatch = next(((a, b) for a, b in zip(theirs, ours) if a != b), (theirs[len(ours):len(ours) + 1] or ["none"], "none"))
        raise ConfigError(f"ControlNet '{source}' does not fit {base}: it has {len(theirs)} residuals, the U-Net takes {len(ours)} "
                          f"(first difference: {mismatch[0]} against {mismatch[1]}; a ControlNet for another base model)")


def export_controlnet(request: ControlNetExportRequest, progress: Progress = lambda _: None) -> str:
    """Export the ControlNet into the engine dir; returns its name."""
    import torch

    from sdfast.export.builtin_controlnet import BUILTIN_CONTROLNETS, ensure_builtin_controlnet
    from sdfast.export.component_export import export_component
    from sdfast.export.recipe import Recipe
    from sdfast.export.source import load_or_refuse, weights_fingerprint

    manifest, name, key = check_request(request)
    builtin = request.source in BUILTIN_CONTROLNETS
    folder = ensure_builtin_controlnet(request.source, progress) if builtin else Path(request.source)
    started = time.perf_counter()
    progress(f"loading ControlNet {folder}")
    from diffusers import ControlNetModel

    controlnet = load_or_refuse(folder, "the ControlNet", lambda: ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32))
    controlnet.eval().requires_grad_(False)
    check_fit(controlnet, manifest, request.source)
    fingerprint = weights_fingerprint(folder)

    recipe = Recipe.load(manifest.family)
    dims = _dimensions(manifest)
    dynamic_json = {dim.name: dim.to_json() for dim in recipe.dynamic_dims(dims).values()}
    if dynamic_json != manifest.data["dynamic_dims"]:
        raise EngineError(f"{request.engine}: its dynamic axes {manifest.data['dynamic_dims']} are not what this sdfast exports "
                          f"({dynamic_json}): re-export the base model")
    unet = manifest.components[manifest.denoiser]
    export_as = SimpleNamespace(precision=manifest.data["precision"], cpu_variant="cpu" in unet.variants)
    model = SimpleNamespace(controlnet=controlnet)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=manifest.root))
    # files named afresh each time: a replaced ControlNet's files stay valid, as the manifest lists them, until it is rewritten
    stem = f"{key}.{secrets.token_hex(4)}"
    try:
        raw_dir = staging / ".raw"
        raw_dir.mkdir()
        entry = export_component(export_as, _AdapterRecipe(recipe), _ControlNetSide, model, stem, dims, dynamic_json, staging, raw_dir,
                                 f"ControlNet {name}", progress)
        raw_dir.rmdir()
        entry["controlnet"] = {
            "name": name,
            "source": {"name": request.source if builtin else folder.name, "path": str(folder.resolve()), "builtin": builtin,
                       "random_weights": builtin, "fingerprint": fingerprint},
        }
        add_to_engine(manifest, {key: entry}, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"ControlNet '{name}' added to {request.engine} in {time.perf_counter() - started:.1f} s")
    return name


def _dimensions(manifest) -> dict:
    """The export's dimensions, from the engine's manifest: its geometry and its U-Net's inputs."""
    from sdfast.runtime.control import is_residual

    geometry, unet = manifest.geometry, manifest.components[manifest.denoiser]
    dims = {key: value for key, value in geometry.items() if isinstance(value, int) and not isinstance(value, bool)}
    width = int(unet.input("encoder_hidden_states").shape[2])
    dims.update(text_hidden=width, context_dim=width,
                control_residuals=[(spec.name, spec.shape[1:]) for spec in unet.inputs if is_residual(spec.name)])
    for input_name, dim in (("text_embeds", "pooled_dim"), ("time_ids", "time_ids_dim")):
        if any(spec.name == input_name for spec in unet.inputs):
            dims[dim] = int(unet.input(input_name).shape[1])
    return dims


class _AdapterRecipe:
    """The family's recipe, its 'controlnet' component exported under the ControlNet's own file stem."""

    def __init__(self, recipe):
        self.recipe, self.opset, self.family = recipe, recipe.opset, recipe.family

    def component(self, name: str, dims: dict, precision: str, fp16_safe: bool = False):
        return replace(self.recipe.component("controlnet", dims, precision, fp16_safe), name=name)


class _ControlNet(__import__("torch").nn.Module):
    """(sample, timestep, encoder_hidden_states, controlnet_cond [B, 3, H, W] in [0, 1]) -> the residuals, unscaled."""

    def __init__(self, model):
        super().__init__()
        self.controlnet = model.controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=1.0, return_dict=False)
        return (*down, mid)


class _ControlNetXL(_ControlNet):
    """SDXL's: (sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond) -> the residuals."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
        return (*down, mid)


class _ControlNetSide:
    """What export_component asks of a family module, for a ControlNet."""

    RELEASES: dict = {}

    class _Wrappers(dict):
        def __missing__(self, key):
            return lambda model: (_ControlNetXL if model.controlnet.config.addition_embed_type == "text_time" else _ControlNet)(model)

    WRAPPERS = _Wrappers()

    @staticmethod
    def fp16_safe(model, name: str) -> bool:
        return False

    @staticmethod
    def fp32_attention_scores(model, name: str) -> str | None:
        if getattr(model.controlnet.config, "upcast_attention", False):
            return "the ControlNet sets upcast_attention: its attention scores overflow fp16 (SD 2.1), as diffusers upcasts them"
        return None

    @staticmethod
    def sample_inputs(recipe, model, purpose: str = "trace", seed: int = 1234) -> dict[str, np.ndarray]:
        """Seeded inputs in each input's realistic range: a control image in [0, 1], time ids as SDXL's pipeline makes them."""
        rng = np.random.default_rng(seed)
        inputs = {}
        for tensor in recipe.inputs:
            shape = tensor.concrete_shape(recipe.dynamic, purpose)
            if tensor.name == "timestep":
                inputs[tensor.name] = np.linspace(999, 1, shape[0]).astype(np.float32)
            elif tensor.name == "controlnet_cond":
                inputs[tensor.name] = rng.uniform(0, 1, size=shape).astype(np.float32)
            elif tensor.name == "time_ids":
                height, width = recipe.inputs[-1].shape[2:]
                row = [height, width, 0, 0, height, width][: shape[1]]
                inputs[tensor.name] = np.tile(np.asarray(row, dtype=np.float32), (shape[0], 1))
            else:
                inputs[tensor.name] = rng.standard_normal(shape).astype(np.float32)
        return inputs
