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
from sdfast.errors import ConfigError, EngineError, ExportError
from sdfast.runtime.files import shared_mode
from sdfast.runtime.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, sha256_file

PRECISIONS = ("fp32", "fp16")
Progress = Callable[[str], None]


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
    family: str = "sd15"
    max_prompt_chunks: int | None = None  # None: the recipe's default; prompts up to this many 75-token chunks
    cpu_variant: bool = True  # also save each graph fully optimized for onnxruntime's CPU provider (fast cold start)


def check_request(request: ExportRequest) -> None:
    """Everything that can be refused before any work is done."""
    for label, value in (("height", request.height), ("width", request.width)):
        if value is not None and (value <= 0 or value % 8):
            raise ConfigError(f"{label} {value} is not a positive multiple of 8; Stable Diffusion works on 8x8 latent cells")
    if request.batch < 1:
        raise ConfigError(f"batch {request.batch} must be at least 1")
    if request.max_prompt_chunks is not None and not 1 <= request.max_prompt_chunks <= 64:
        raise ConfigError(f"max prompt chunks {request.max_prompt_chunks} must be from 1 to 64")
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
    from sdfast.export.recipe import Recipe
    from sdfast.export.source import check_model_folder

    recipe = Recipe.load(request.family)
    builtin = request.model in BUILTIN_MODELS
    folder = ensure_builtin(request.model, progress) if builtin else Path(request.model)
    check_model_folder(folder, recipe.data["pipeline_classes"])

    out = request.out
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.absolute().parent))
    os.chmod(staging, shared_mode(directory=True))  # mkdtemp makes it private; the engine dir should not be
    try:
        manifest = _build(request, recipe, folder, builtin, staging, progress)
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


def _build(request: ExportRequest, recipe, folder: Path, builtin: bool, staging: Path, progress: Progress) -> dict:
    import torch

    from sdfast.export.components import WRAPPERS, sample_inputs
    from sdfast.export.onnx_export import export_to_onnx
    from sdfast.export.parity import compare, torch_outputs
    from sdfast.export.source import load_model, weights_fingerprint
    from sdfast.runtime.backends import get_backend
    from sdfast.runtime.manifest import ComponentInfo

    started = time.perf_counter()
    progress(f"loading {folder}")
    model = load_model(folder)
    fingerprint = weights_fingerprint(folder)
    dims = _dimensions(request, recipe, model)
    progress(
        f"geometry: {dims['width']}x{dims['height']}, batch {request.batch}, U-Net batch {dims['unet_batch']} "
        f"({'with' if request.guidance else 'without'} classifier-free guidance), {request.precision}"
    )

    tokenizer_info = _copy_tokenizer(model, folder, staging, dims["text_length"])
    scheduler_dir = staging / "scheduler"
    scheduler_dir.mkdir()
    shutil.copy(folder / "scheduler" / "scheduler_config.json", scheduler_dir / "scheduler_config.json")
    scheduler_info = {"file": "scheduler/scheduler_config.json", "files": _hashed(staging, [scheduler_dir / "scheduler_config.json"]),
                      "class": model.scheduler_config.get("_class_name")}

    dynamic_json = {dim.name: dim.to_json() for dim in recipe.dynamic_dims(dims).values()}
    components = {}
    raw_dir = staging / ".raw"
    raw_dir.mkdir()
    names = recipe.component_names
    for index, name in enumerate(names, 1):
        component = recipe.component(name, dims, request.precision)
        label = f"[{index}/{len(names)}] {name}"
        module = WRAPPERS[name](model).eval()
        step = time.perf_counter()
        raw_path = raw_dir / f"{name}.onnx"
        try:
            export_to_onnx(module, component, sample_inputs(component, model, "trace"), raw_path, recipe.opset)
        except Exception as error:  # noqa: BLE001 - exporter failures are many types; report one line
            raise ExportError(f"{name}: ONNX export failed: {str(error).strip().splitlines()[0]}") from None
        exported_s = time.perf_counter() - step
        try:
            flops = _flops_entry(raw_path, component)
        except Exception as error:  # noqa: BLE001 - onnx raises many types; the count is informative, not essential
            flops = {"per_call": None, "error": str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}
        counted = f"{flops['per_call'] / 1e9:.3g} GFLOP per call" if flops["per_call"] else "FLOPs not counted: " + flops["error"]
        progress(f"{label}: exported to ONNX in {exported_s:.1f} s ({counted})")

        step = time.perf_counter()
        files, variants, fp16_record = _graphs(request, component, raw_path, staging, label, progress)
        optimized_s = time.perf_counter() - step
        for leftover in raw_dir.glob(f"{name}.*"):
            leftover.unlink()
        file_info = _hashed(staging, files)
        entry = {
            "role": component.role,
            **({"optional": True} if component.optional else {}),
            "file": files[0].name,
            "files": file_info,
            "inputs": [t.to_json() for t in component.inputs],
            "outputs": [t.to_json() for t in component.outputs],
            "precision": component.precision,
            **({"fp16": fp16_record} if fp16_record else {}),
            "opset": recipe.opset,
            "optimization": {"tool": "onnxruntime", "level": "ORT_ENABLE_BASIC", "for": "any execution provider; standard ONNX ops only (TensorRT parses it)"},
            "flops": flops,
        }
        size_mib = sum(f["bytes"] for v in [{"files": file_info}, *variants.values()] for f in v["files"].values()) / 2**20
        with_variants = f", with {' and '.join(v.upper() for v in variants)} variant{'s' if len(variants) > 1 else ''}" if variants else ""
        progress(f"{label}: optimized offline in {optimized_s:.1f} s ({component.precision}, {size_mib:.1f} MiB{with_variants})")

        step = time.perf_counter()
        inputs = sample_inputs(component, model, "parity")
        expected = torch_outputs(module, component, inputs)
        cpu = get_backend("cpu")
        for variant_name, target in [("portable", entry), *variants.items()]:
            # the CPU variant loads through the backend's own variant choice; the CUDA variant is loaded on the CPU directly
            listed = variants if variant_name == "cpu" else {}
            info = ComponentInfo.from_json(name, {**entry, "file": target["file"], "variants": listed}, dynamic_json)
            try:
                engine = cpu.load(info, staging / (entry if variant_name == "cpu" else target)["file"])
            except EngineError as error:
                if variant_name != "cuda":
                    raise
                target["parity"] = {"checked": False, "why": f"the CPU provider cannot run it ({error})"}
                progress(f"{label}: cuda parity not checked here: the CPU provider cannot run its fused ops")
                continue
            parity = compare(engine.run(inputs), expected, component.tolerance)
            del engine
            target["parity"] = {
                **parity.to_json(), "backend": "cpu", "reference": f"torch {torch.__version__} fp32 CPU",
                "input_shapes": {key: list(value.shape) for key, value in inputs.items()},
            }
            verdict = "ok" if parity.passed else "FAILED"
            progress(f"{label}: {variant_name if variants else ''}{' ' if variants else ''}parity vs PyTorch max_abs {parity.max_abs:.2e}, "
                     f"max_rel {parity.max_rel:.2e} (tolerance {parity.tolerance:.0e}) {verdict}")
            if not parity.passed:
                raise ExportError(
                    f"{name}: ONNX output differs from PyTorch ({variant_name} graph) by max_rel {parity.max_rel:.3g}"
                    f"{'' if parity.finite else ' with NaN/inf'}, above the {component.precision} tolerance {parity.tolerance:g}"
                )
        if variants:
            entry["variants"] = variants
        entry["export_seconds"] = round(time.perf_counter() - step + exported_s + optimized_s, 2)
        components[name] = entry
    raw_dir.rmdir()
    progress(f"export finished in {time.perf_counter() - started:.1f} s")

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
        "latent": {
            "channels": dims["latent_channels"], "factor": recipe.latent_factor,
            "scaling_factor": float(model.vae.config.scaling_factor),
            "shift_factor": float(getattr(model.vae.config, "shift_factor", None) or 0.0),
        },
        "parametrization": {"prediction_type": model.scheduler_config.get("prediction_type") or "epsilon"},
        "model": {
            "unet_in_channels": dims["unet_in_channels"],
            "text_hidden": dims["text_hidden"],
            "text_layers": int(model.text_encoder.config.num_hidden_layers),  # clip skip goes from 1 to this
        },
        "precision": request.precision,
        "tokenizers": {"text_encoder": tokenizer_info},  # keyed by the component each one feeds
        "scheduler": scheduler_info,
        "components": components,
        "libraries": _library_versions(),
        "export_seconds": round(time.perf_counter() - started, 1),
    }


def _graphs(request: ExportRequest, component, raw_path: Path, staging: Path, label: str, progress: Progress):
    """The component's files: the portable graph (fp32 or fp16) and its per-backend variants.

    fp32: the portable graph, plus the CPU variant (Winograd, MHA, onnxruntime's NCHWc layouts for this CPU).
    fp16: the portable graph converted to fp16, plus the CUDA variant (MHA and the GPU fusions, then fp16).
    Returns (files, variants, the manifest's fp16 record or None).
    """
    import onnxruntime

    from sdfast.export.fp16 import convert_to_fp16
    from sdfast.export.onnx_export import optimize_offline, rewrite_for_cpu, rewrite_for_cuda
    from sdfast.runtime.backends import cpu_isa

    name, raw_dir = component.name, raw_path.parent
    variants: dict[str, dict] = {}
    if component.precision == "fp16":
        optimized = optimize_offline(raw_path, raw_dir / f"{name}.fp32.onnx")[0]
        files, fp16_record = convert_to_fp16(optimized, staging / f"{name}.onnx", list(component.keep_fp32_ops))
        if component.ort_model_type:
            fused_path = raw_dir / f"{name}.cuda32.onnx"
            fusions = rewrite_for_cuda(raw_path, fused_path, component.ort_model_type)
            cuda_files, _ = convert_to_fp16(fused_path, staging / f"{name}.cuda.onnx", list(component.keep_fp32_ops))
            variants["cuda"] = {"file": cuda_files[0].name, "files": _hashed(staging, cuda_files), "optimization": {
                "tool": "onnxruntime.transformers.optimizer", "model_type": component.ort_model_type, "for": "CUDAExecutionProvider",
                "onnxruntime": onnxruntime.__version__, "fusions": fusions}}
        return files, variants, fp16_record
    files = optimize_offline(raw_path, staging / f"{name}.onnx")
    fp16_record = {"kept_fp32": "whole component", "why": component.whole_fp32_reason} if component.whole_fp32_reason else None
    if request.cpu_variant:
        rewritten = raw_dir / f"{name}.cpu.onnx"
        try:
            rewrites = rewrite_for_cpu(raw_path, rewritten)
        except Exception as error:  # noqa: BLE001 - a rewrite that fails leaves the plain graph, said in one line
            progress(f"{label}: CPU rewrites skipped ({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})")
            rewritten, rewrites = raw_path, {"skipped": True}
        cpu_files = optimize_offline(rewritten, staging / f"{name}.cpu.onnx", "ORT_ENABLE_ALL")
        variants["cpu"] = {"file": cpu_files[0].name, "files": _hashed(staging, cpu_files), "optimization": {
            "tool": "onnxruntime", "level": "ORT_ENABLE_ALL", "for": "CPUExecutionProvider", "onnxruntime": onnxruntime.__version__,
            "isa": cpu_isa(), "rewrites": rewrites}}
    return files, variants, fp16_record


def _flops_entry(raw_path: Path, component) -> dict:
    """The arithmetic of one call, counted on the exported graph (before any runtime rewrites it)."""
    from sdfast.export.flops import COUNTED_OPS, count_flops

    shapes = {t.name: t.concrete_shape(component.dynamic, "parity") for t in component.inputs}  # dynamic axes at their smallest
    return {
        "per_call": count_flops(raw_path, shapes),
        "input_shapes": {name: list(shape) for name, shape in shapes.items()},
        "counts": f"2 x multiply-accumulates of {', '.join(COUNTED_OPS)}",
    }


def _dimensions(request: ExportRequest, recipe, model) -> dict[str, int]:
    factor = recipe.latent_factor
    native = int(model.unet.config.sample_size) * factor
    height = request.height or native
    width = request.width or native
    text_length = int(model.tokenizer.model_max_length)
    if text_length > int(model.text_encoder.config.max_position_embeddings):
        text_length = int(model.text_encoder.config.max_position_embeddings)
    return {
        "height": height, "width": width, "batch": request.batch,
        "unet_batch": request.batch * (2 if request.guidance else 1),
        "latent_height": height // factor, "latent_width": width // factor,
        "latent_channels": int(model.vae.config.latent_channels), "unet_in_channels": int(model.unet.config.in_channels),
        "text_length": text_length, "text_hidden": int(model.text_encoder.config.hidden_size),
        "max_text_chunks": request.max_prompt_chunks or int(recipe.defaults.get("max_text_chunks", 1)),
    }


def _hashed(root: Path, paths: list[Path]) -> dict[str, dict]:
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}


def _copy_tokenizer(model, folder: Path, staging: Path, text_length: int) -> dict:
    """A tokenizer.json for the lean runtime (converted by transformers if the folder has only vocab/merges)."""
    target = staging / "tokenizer"
    tokenizer = model.tokenizer
    tokenizer.save_pretrained(target)
    for name in ("vocab.json", "merges.txt"):
        if (folder / "tokenizer" / name).is_file():
            shutil.copy(folder / "tokenizer" / name, target / name)
    special = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    if not (target / "tokenizer.json").is_file():
        raise ExportError(f"could not produce tokenizer.json from {folder / 'tokenizer'}")
    missing = [key for key, value in special.items() if value is None]
    if missing:
        raise ExportError(f"the tokenizer in {folder / 'tokenizer'} defines no {', '.join(missing)} token")
    return {
        "file": "tokenizer/tokenizer.json",
        "files": _hashed(staging, sorted(p for p in target.iterdir() if p.is_file())),
        **{key: int(value) for key, value in special.items()},
        "max_length": text_length,
    }
