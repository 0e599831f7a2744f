"""``sdfast export``: a diffusers folder -> an engine dir, built in a staging dir and renamed into place."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdfast import __version__
from sdfast.errors import ConfigError
from sdfast.runtime.files import shared_mode
from sdfast.export.staging import hashed
from sdfast.runtime.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME

PRECISIONS = ("fp32", "fp16")
MAX_SIZES = 16
T5_OPTIONS = ("none", "fp32", "fp16", "int8")  # SD3's T5-XXL encoder: left out (zeros), or exported in this precision
Progress = Callable[[str], None]
TINY_VAE = "vae_decoder_tiny"


@dataclass(frozen=True)
class ExportRequest:
    model: str  # a diffusers folder, or a built-in name: tiny, sd15
    out: Path
    height: int | None = None  # None: the model's native size
    width: int | None = None
    batch: int = 1
    precision: str = "fp32"
    guidance: bool = True
    force: bool = False
    family: str | None = None  # None: from model_index.json's pipeline class
    max_prompt_chunks: int | None = None  # None: the recipe's default; prompts up to this many 75-token chunks
    cpu_variant: bool = True  # also save each graph fully optimized for onnxruntime's CPU provider (fast cold start)
    t5: str | None = None  # SD3's T5-XXL: none (zeros, the default), fp32, fp16 or int8 (dynamic MatMul quantization)
    controlnet_inputs: bool = True  # the U-Net takes ControlNet residuals (zeros without one); False: the plain graph
    loras: tuple = ()  # (path, scale) pairs: LoRAs fused into the weights before export (recorded in the fingerprint)
    sizes: tuple = ()  # more (width, height) image sizes: static graphs of the size-dependent components over one copy of the weights
    step_cache: bool = False  # DeepCache: the U-Net also returns its deep feature, and a shallow U-Net reuses it (export/step_cache.py)
    step_cache_depth: int = 1  # layers of the first down block the shallow U-Net runs (0 .. that block's layer count)
    tiny_vae: str | None = None  # an AutoencoderTiny (TAESD) folder or built-in name: exported as vae_decoder_tiny (export/tiny_vae.py)
    guidance_truncation: bool = False  # also the U-Net at the images' batch (unet_cond), over the guided U-Net's weights
    vae_tile: int | None = None  # also the VAE decoder and encoder at this tile size, pixels (tiled VAE: runtime/tiled_vae.py)


def check_request(request: ExportRequest) -> None:
    """Everything that can be refused before any work is done."""
    sizes = [("height", request.height), ("width", request.width)]
    sizes += [(f"--size {w}x{h}: {label}", value) for w, h in request.sizes for label, value in (("height", h), ("width", w))]
    for label, value in sizes:
        if value is not None and (value <= 0 or value % 8):
            raise ConfigError(f"{label} {value} is not a positive multiple of 8; Stable Diffusion works on 8x8 latent cells")
    if len(request.sizes) > MAX_SIZES:
        raise ConfigError(f"{len(request.sizes)} sizes: an engine dir holds at most {MAX_SIZES} (each is a static graph per component)")
    if request.step_cache_depth < 0:
        raise ConfigError(f"--step-cache-depth {request.step_cache_depth} must be 0 or more")
    if request.vae_tile is not None and (request.vae_tile < 64 or request.vae_tile % 64):
        raise ConfigError(f"--vae-tile {request.vae_tile} must be a multiple of 64 pixels (8 latent cells in 8-cell steps)")
    if request.guidance_truncation and not request.guidance:
        raise ConfigError("--guidance-truncation needs classifier-free guidance: it cannot go with --no-guidance")
    if request.guidance_truncation and request.sizes:
        raise ConfigError("--guidance-truncation with --size is not supported yet: export one size")
    if request.batch < 1:
        raise ConfigError(f"batch {request.batch} must be at least 1")
    if request.max_prompt_chunks is not None and not 1 <= request.max_prompt_chunks <= 64:
        raise ConfigError(f"max prompt chunks {request.max_prompt_chunks} must be from 1 to 64")
    from sdfast.export.families import FAMILIES

    if request.family is not None and request.family not in FAMILIES:
        raise ConfigError(f"--family '{request.family}' is not a model family sdfast exports ({', '.join(FAMILIES)})")
    if request.t5 is not None and request.t5 not in T5_OPTIONS:
        raise ConfigError(f"--t5 '{request.t5}' is not one of {', '.join(T5_OPTIONS)}")
    if request.loras:
        from sdfast.export.lora_fuse import check_lora_files

        check_lora_files(request.loras)
    if request.precision not in PRECISIONS:
        raise ConfigError(f"precision '{request.precision}' is not supported yet; choose one of {', '.join(PRECISIONS)}")
    out = request.out
    if out.exists() and not request.force:
        raise ConfigError(f"'{out}' already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ConfigError(f"'{out}' is not empty and is not an engine dir; --force only replaces engine dirs")
    model = Path(request.model).absolute()
    if model.is_dir() and (out.absolute() == model or model in out.absolute().parents or out.absolute() in model.parents):
        raise ConfigError(f"--out '{out}' overlaps the model folder '{request.model}'")
    existing = next(p for p in out.absolute().parents if p.exists())  # missing parents are created
    if not existing.is_dir():
        raise ConfigError(f"cannot write '{out}': '{existing}' is not a directory")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"cannot write '{out}': permission denied in '{existing}'")


def _library_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "sdfast": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def export_engine(request: ExportRequest, progress: Progress = lambda _: None) -> Path:
    """Export every component of the recipe, check parity, and write the engine dir atomically."""
    check_request(request)
    from sdfast.export.builtin import BUILTIN_MODELS, ensure_builtin
    from sdfast.export.families import export_module, family_for_pipeline
    from sdfast.export.recipe import Recipe
    from sdfast.export.source import check_model_folder, read_model_index

    builtin = request.model in BUILTIN_MODELS
    folder = ensure_builtin(request.model, progress) if builtin else Path(request.model)
    pipeline_class = read_model_index(folder).get("_class_name")
    recipe = Recipe.load(request.family or family_for_pipeline(pipeline_class, folder))
    if request.t5 not in (None, "none") and "t5_options" not in recipe.data:
        raise ConfigError(f"--t5 applies to the sd3 family (SD3, SD3.5) only, not to {recipe.family}")
    multiple = int(recipe.data.get("size_multiple", recipe.latent_factor))  # SD3: 8x8 latent cells in 2x2 patches
    sized = [(f"--size {w}x{h}: {label}", value) for w, h in request.sizes for label, value in (("height", h), ("width", w))]
    for label, value in [("height", request.height), ("width", request.width), *sized]:
        if value is not None and value % multiple:
            raise ConfigError(f"{label} {value} is not a multiple of {multiple}, which the {recipe.family} family needs")
    check_model_folder(folder, recipe, pipeline_class if request.family is None else None)
    family = export_module(recipe)
    asked = recipe.asked_components(request)
    if request.step_cache and "unet_shallow" not in asked:
        raise ConfigError(f"--step-cache is for U-Net families (sd15, sdxl); the {recipe.family} family has no shallow denoiser")
    if request.guidance_truncation and "unet_cond" not in asked:
        raise ConfigError(f"--guidance-truncation is for U-Net families (sd15, sdxl), not for the {recipe.family} family yet")
    if request.tiny_vae is not None:
        from sdfast.export.tiny_vae import tiny_vae_folder

        tiny_vae_folder(request.tiny_vae)  # a wrong path is refused before the model loads

    out = request.out
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.absolute().parent))
    os.chmod(staging, shared_mode(directory=True))  # mkdtemp makes it private; the engine dir should not be
    try:
        manifest = _build(request, recipe, family, folder, builtin, staging, progress)
        for written in staging.rglob("*"):  # some writers (large external-data files) create 0600; an engine dir is shared
            os.chmod(written, shared_mode(directory=written.is_dir()))
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")  # last: the dir now loads
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace_dir(staging: Path, out: Path) -> None:
    if out.exists():
        retired = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def _build(request: ExportRequest, recipe, family, folder: Path, builtin: bool, staging: Path, progress: Progress) -> dict:
    """Load the folder with the family's module, export each component of the recipe, and return the manifest."""
    from sdfast.export.component_export import export_component
    from sdfast.export.source import weights_fingerprint

    started = time.perf_counter()
    progress(f"loading {folder} ({recipe.family})")
    model = family.load(folder, request)
    model.step_cache_depth = request.step_cache_depth if request.step_cache else None  # the U-Net wrappers read it
    if request.tiny_vae is not None:
        from sdfast.export.tiny_vae import load_tiny_vae

        model.tiny_vae = load_tiny_vae(request.tiny_vae, int(model.vae.config.latent_channels))
    from sdfast.export.lora_fuse import fuse_loras, fused_fingerprint

    fused = fuse_loras(model, request.loras, progress) if request.loras else []
    fingerprint = fused_fingerprint(weights_fingerprint(folder), fused)
    dims = _with_tile(family.dimensions(request, recipe, model), request, recipe)
    progress(
        f"geometry: {dims['width']}x{dims['height']}, batch {request.batch}, denoiser batch {dims['unet_batch']} "
        f"({'with' if request.guidance else 'without'} classifier-free guidance), {request.precision}"
    )

    tokenizers = family.tokenizers(model, folder, staging, dims)
    scheduler_dir = staging / "scheduler"
    scheduler_dir.mkdir()
    shutil.copy(folder / "scheduler" / "scheduler_config.json", scheduler_dir / "scheduler_config.json")
    scheduler_info = {"file": "scheduler/scheduler_config.json", "files": hashed(staging, [scheduler_dir / "scheduler_config.json"]),
                      "class": model.scheduler_config.get("_class_name")}

    from sdfast.export.sized_export import export_sizes, extra_size_dims, size_dependent
    from sdfast.runtime.manifest import size_key

    extra = [size for size in dict.fromkeys(request.sizes) if size != (dims["width"], dims["height"])]
    sized_dims = {key: _with_tile(at, request, recipe) for key, at in extra_size_dims(family, recipe, model, request, extra).items()}
    if extra:
        progress(f"sizes: {', '.join([size_key(dims['width'], dims['height']), *sized_dims])} (the first is the default)")
    family_blocks = family.manifest_blocks(recipe, model, dims)  # before the components' export frees the modules it reads
    dynamic_json = {dim.name: dim.to_json() for dim in recipe.dynamic_dims(dims).values()}
    raw_dir = staging / ".raw"
    raw_dir.mkdir()
    names = family.components(recipe, model)
    asked = recipe.asked_components(request)
    for name in ("unet_shallow", "unet_cond"):  # before the U-Net, whose export frees the module they use
        if name in asked:
            names = [*names[:names.index("unet")], name, *names[names.index("unet"):]]
    for name in reversed((TINY_VAE, "vae_decoder_tile", "vae_encoder_tile")):  # after the full decoder, before the VAE
        if name in asked:                                                     # encoder's export frees the VAE they read
            names.insert(names.index("vae_decoder") + 1, name)
    components = {}
    for index, name in enumerate(names, 1):
        label = f"[{index}/{len(names)}] {name}"
        if sized_dims and size_dependent(recipe, family, model, name, request.precision, dims, list(sized_dims.values())):
            components[name] = export_sizes(request, recipe, family, model, name, dims, sized_dims, dynamic_json, staging, raw_dir,
                                            label, progress)
        else:
            components[name] = export_component(request, recipe, family, model, name, dims, dynamic_json, staging, raw_dir, label,
                                                progress)
    raw_dir.rmdir()
    if "unet_cond" in components:  # one copy of the U-Net's weights for the guided and the cond-only graphs
        from sdfast.export.shared_weights import share_between

        shared = share_between(staging, "unet", [components["unet"], components["unet_cond"]])
        progress(f"unet and unet_cond: {shared['stored']} distinct weights of {shared['tensors']} stored once "
                 f"({shared['saved_bytes'] / 2**30:.2f} GiB not written again)")
    progress(f"export finished in {time.perf_counter() - started:.1f} s")
    manifest = _manifest(request, recipe, folder, builtin, fingerprint, dims, dynamic_json, family_blocks, tokenizers, scheduler_info,
                         components, time.perf_counter() - started)
    manifest["sizes"] = [{key: at[key] for key in ("width", "height", "latent_width", "latent_height")}
                         for at in (dims, *sized_dims.values())]
    if fused:
        manifest["source"]["fused_loras"] = fused
    return manifest


def _with_tile(dims: dict, request: ExportRequest, recipe) -> dict:
    """The tiled VAE's tile dimensions (--vae-tile), the same at every size; refused when larger than an image side."""
    if request.vae_tile is None:
        return dims
    if request.vae_tile > min(dims["height"], dims["width"]):
        raise ConfigError(f"--vae-tile {request.vae_tile} is larger than the image ({dims['width']}x{dims['height']}): a tile must fit in it")
    latent = request.vae_tile // recipe.latent_factor
    return {**dims, "tile_height": request.vae_tile, "tile_width": request.vae_tile, "tile_latent_height": latent,
            "tile_latent_width": latent}


def _manifest(request: ExportRequest, recipe, folder: Path, builtin: bool, fingerprint: str, dims: dict, dynamic_json: dict,
              family_blocks: dict, tokenizers: dict, scheduler_info: dict, components: dict, seconds: float) -> dict:
    """manifest.json's content: format, source, geometry, the family's blocks, tokenizers, scheduler and components."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "family": recipe.family,
        "source": {
            "name": request.model if builtin else folder.name,
            "path": str(folder.resolve()),
            "builtin": builtin,
            "random_weights": builtin,
            "fingerprint": fingerprint,
        },
        "geometry": {
            "height": dims["height"], "width": dims["width"], "batch": request.batch, "guidance": request.guidance,
            "unet_batch": dims["unet_batch"], "latent_channels": dims["latent_channels"],
            "latent_height": dims["latent_height"], "latent_width": dims["latent_width"], "text_length": dims["text_length"],
            "max_text_chunks": dims["max_text_chunks"],
        },
        "dynamic_dims": dynamic_json,
        **family_blocks,  # latent, parametrization, model
        "precision": request.precision,
        "tokenizers": tokenizers,  # keyed by the text encoder each one feeds
        "scheduler": scheduler_info,
        "components": components,
        "libraries": _library_versions(),
        "export_seconds": round(seconds, 1),
    }
