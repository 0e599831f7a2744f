"""One component of an export: the PyTorch module to ONNX, its FLOPs, its graphs and variants, and parity with PyTorch."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from sdfast.errors import EngineError, ExportError
from sdfast.export.fp16 import KeptMatMuls, convert_to_fp16, modules_kept_fp32
from sdfast.export.staging import hashed

Progress = Callable[[str], None]


def export_component(request, recipe, family, model, name: str, dims: dict, dynamic_json: dict, staging: Path, raw_dir: Path,
                     label: str, progress: Progress, keep_module: bool = False, map_parameters: bool = True) -> dict:
    """The manifest entry of component ``name``, its files written into ``staging``; ExportError when parity fails.

    ``keep_module``: leave the PyTorch module loaded (another size exports it next); ``map_parameters``: write the LoRA
    parameter map (the caller does, once every size's graphs are written, when False).
    """
    import torch

    from sdfast.export.onnx_export import export_to_onnx
    from sdfast.export.parity import compare, torch_outputs
    from sdfast.runtime.backends import get_backend
    from sdfast.runtime.manifest import ComponentInfo

    # a family may export one component in another precision (SD3's T5: --t5 fp16 or int8 in an fp32 export)
    precision = getattr(family, "component_precision", lambda _model, _name, asked: asked)(model, name, request.precision)
    component = recipe.component(name, dims, precision, fp16_safe=family.fp16_safe(model, name))
    fp32_scores = family.fp32_attention_scores(model, name)
    module = family.WRAPPERS[name](model).eval()
    kept_matmuls = modules_kept_fp32(module) if precision in ("fp16", "int8") else None  # T5's wo, as transformers keeps it
    step = time.perf_counter()
    raw_path = raw_dir / f"{name}.onnx"
    try:
        export_to_onnx(module, component, family.sample_inputs(component, model, "trace"), raw_path, recipe.opset)
    except Exception as error:  # noqa: BLE001 - exporter failures are many types; report one line
        raise ExportError(f"{name}: ONNX export failed: {str(error).strip().splitlines()[0]}") from None
    # PyTorch's side of the parity check now, so its weights can go before onnxruntime loads the graph (SDXL's U-Net
    # is 10 GB in fp32: holding both would not fit a 24 GB machine)
    inputs = family.sample_inputs(component, model, "parity")
    expected = torch_outputs(module, component, inputs)
    lora = lora_fingerprints(request, component, precision, module, model) if map_parameters else None
    del module
    if not keep_module:
        release(model, family.RELEASES.get(name, ()))
    exported_s = time.perf_counter() - step
    try:
        flops = flops_entry(raw_path, component)
    except Exception as error:  # noqa: BLE001 - onnx raises many types; the count is informative, not essential
        flops = {"per_call": None, "error": str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}
    counted = f"{flops['per_call'] / 1e9:.3g} GFLOP per call" if flops["per_call"] else "FLOPs not counted: " + flops["error"]
    progress(f"{label}: exported to ONNX in {exported_s:.1f} s ({counted})")

    step = time.perf_counter()
    try:
        files, variants, fp16_record = graphs(request, component, raw_path, staging, label, progress, fp32_scores, kept_matmuls)
    except graph_write_errors() as error:  # onnxruntime's optimizer and writers, the OS: one line, with the disk's state
        text = str(error).strip().splitlines()
        raise ExportError(f"{name}: optimizing and writing its graphs failed: {text[-1] if text else type(error).__name__}{disk_hint(staging)}") from None
    optimized_s = time.perf_counter() - step
    for leftover in raw_dir.glob(f"{name}.*"):
        leftover.unlink()
    file_info = hashed(staging, files)
    entry = {
        "role": component.role,
        **({"optional": True} if component.optional else {}),
        "file": files[0].name,
        "files": file_info,
        "inputs": [t.to_json() for t in component.inputs],
        "outputs": [t.to_json() for t in component.outputs],
        "precision": component.precision,
        # the reduced-precision policy: what stayed fp32 in an fp16 graph ("fp16") or unquantized in an int8 one ("int8")
        **({"int8" if component.precision == "int8" else "fp16": fp16_record} if fp16_record else {}),
        "opset": recipe.opset,
        "optimization": ({"tool": "onnxruntime.quantization.quantize_dynamic", "ops": ["MatMul"], "weights": "int8 per channel",
                          "for": "onnxruntime (MatMulInteger, DynamicQuantizeLinear): not a TensorRT graph"}
                         if component.precision == "int8" else
                         {"tool": "onnxruntime", "level": "ORT_ENABLE_BASIC", "for": "any execution provider; standard ONNX ops only (TensorRT parses it)"}),
        "flops": flops,
    }
    size_mib = sum(f["bytes"] for v in [{"files": file_info}, *variants.values()] for f in v["files"].values()) / 2**20
    with_variants = f", with {' and '.join(v.upper() for v in variants)} variant{'s' if len(variants) > 1 else ''}" if variants else ""
    progress(f"{label}: optimized offline in {optimized_s:.1f} s ({component.precision}, {size_mib:.1f} MiB{with_variants})")

    step = time.perf_counter()
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
    if lora is not None:
        entry["parameter_map"] = parameter_map_entry(name, lora, [staging / entry["file"], *(staging / v["file"] for v in variants.values())],
                                                     staging, label, progress)
    entry["export_seconds"] = round(time.perf_counter() - step + exported_s + optimized_s, 2)
    return entry


def lora_fingerprints(request, component, precision: str, module, model):
    """(target shapes, fingerprints) of the weights a LoRA can patch in this component, or None where LoRAs do not apply."""
    from sdfast.export.parameter_map import LORA_ROLES, fingerprints, lora_targets, owners_of
    from sdfast.runtime.backends import cpu_isa

    if component.role not in LORA_ROLES or precision not in ("fp32", "fp16"):
        return None
    targets = lora_targets(module, owners_of(model))
    block = {"avx512f": 16, "avx2": 8}.get(cpu_isa()) if request.cpu_variant and precision == "fp32" else None
    return {name: weight.shape for name, weight in targets.items()}, fingerprints(targets, precision == "fp16", block)


def parameter_map_entry(name: str, lora, graph_files: list[Path], staging: Path, label: str, progress: Progress) -> dict:
    """The manifest's record of ``{name}.parameters.json``: where each LoRA-patchable weight is in each graph."""
    from sdfast.export.parameter_map import write_parameter_map

    shapes, prints = lora
    path, summary = write_parameter_map(name, shapes, prints, graph_files, staging)
    progress(f"{label}: LoRA parameter map: " + ", ".join(f"{graph} {s['mapped']}/{s['of']}" for graph, s in summary.items()))
    return {"file": path.name, "files": hashed(staging, [path]), "graphs": summary}


def graph_write_errors() -> tuple[type[BaseException], ...]:
    """What optimizing and writing a graph raises when the machine, not sdfast, is at fault: onnxruntime's own
    exception types (they derive from Exception only), the OS's, and numpy/onnx's on a graph they cannot take."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort

    return (OSError, RuntimeError, ValueError, MemoryError, ort.Fail, ort.RuntimeException, ort.InvalidArgument, ort.NoSuchFile,
            ort.InvalidGraph, ort.InvalidProtobuf, ort.NotImplemented)


def disk_hint(folder: Path) -> str:
    """A note on the free space where the engine dir is written, when it is low enough to explain a failed write."""
    import shutil

    free = shutil.disk_usage(folder).free
    return f" ({free / 2**30:.1f} GiB free in {folder.parent}: the disk is full?)" if free < 4 * 2**30 else ""


def release(model, attributes: tuple[str, ...]) -> None:
    """Drop the PyTorch modules no later component needs, and give their memory back."""
    import gc

    for attribute in attributes:
        setattr(model, attribute, None)
    gc.collect()


def graphs(request, component, raw_path: Path, staging: Path, label: str, progress: Progress, fp32_scores: str | None = None,
           kept_matmuls: KeptMatMuls | None = None):
    """The component's files: the portable graph (fp32 or fp16) and its per-backend variants.

    fp32: the portable graph, plus the CPU variant (Winograd, MHA, onnxruntime's NCHWc layouts for this CPU).
    fp16: the portable graph converted to fp16, plus the CUDA variant (MHA and the GPU fusions, then fp16).
    int8: onnxruntime's dynamic quantization of the MatMul weights.
    ``fp32_scores``: why this component's attention scores stay fp32 in fp16 graphs (the family's policy), or None.
    ``kept_matmuls``: MatMuls that stay fp32 (fp16) or unquantized (int8), as transformers keeps T5's wo.
    Returns (files, variants, the manifest's fp16 or int8 record, or None).
    """
    import onnxruntime

    from sdfast.export.onnx_export import optimize_offline, rewrite_for_cpu, rewrite_for_cuda
    from sdfast.runtime.backends import cpu_isa

    name, raw_dir = component.name, raw_path.parent
    variants: dict[str, dict] = {}
    if component.precision == "int8":  # onnxruntime's dynamic quantization of the MatMul weights (per channel)
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        optimized = optimize_offline(raw_path, raw_dir / f"{name}.fp32.onnx")[0]
        excluded = kept_matmuls.nodes(onnx.load(str(optimized), load_external_data=False).graph, name) if kept_matmuls else []
        quantize_dynamic(optimized, staging / f"{name}.onnx", op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=True, use_external_data_format=True, nodes_to_exclude=excluded)
        files = sorted(p for p in staging.glob(f"{name}.onnx*") if p.is_file())
        return files, variants, {"fp32_matmuls": kept_matmuls.to_json(len(excluded))} if kept_matmuls else None
    if component.precision == "fp16":
        optimized = optimize_offline(raw_path, raw_dir / f"{name}.fp32.onnx")[0]
        files, fp16_record = convert_to_fp16(optimized, staging / f"{name}.onnx", list(component.keep_fp32_ops), fp32_scores, kept_matmuls)
        if component.ort_model_type:
            fused_path = raw_dir / f"{name}.cuda32.onnx"
            fusions = rewrite_for_cuda(raw_path, fused_path, component.ort_model_type)
            # fused attention (MultiHeadAttention) keeps its scores in fp32 accumulators; any left unfused is blocked here
            cuda_files, _ = convert_to_fp16(fused_path, staging / f"{name}.cuda.onnx", list(component.keep_fp32_ops), fp32_scores, kept_matmuls)
            variants["cuda"] = {"file": cuda_files[0].name, "files": hashed(staging, cuda_files), "optimization": {
                "tool": "onnxruntime.transformers.optimizer", "model_type": component.ort_model_type, "for": "CUDAExecutionProvider",
                "onnxruntime": onnxruntime.__version__, "fusions": fusions}}
        return files, variants, fp16_record
    files = optimize_offline(raw_path, staging / f"{name}.onnx")
    fp16_record = {"kept_fp32": "whole component", "why": component.whole_fp32_reason} if component.whole_fp32_reason else None
    if request.cpu_variant:
        rewritten = raw_dir / f"{name}.cpu.onnx"
        try:
            rewrites = rewrite_for_cpu(raw_path, rewritten, winograd=component.role in ("denoiser", "controlnet"))
        except Exception as error:  # noqa: BLE001 - a rewrite that fails leaves the plain graph, said in one line
            progress(f"{label}: CPU rewrites skipped ({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})")
            rewritten, rewrites = raw_path, {"skipped": True}
        cpu_files = optimize_offline(rewritten, staging / f"{name}.cpu.onnx", "ORT_ENABLE_ALL")
        variants["cpu"] = {"file": cpu_files[0].name, "files": hashed(staging, cpu_files), "optimization": {
            "tool": "onnxruntime", "level": "ORT_ENABLE_ALL", "for": "CPUExecutionProvider", "onnxruntime": onnxruntime.__version__,
            "isa": cpu_isa(), "rewrites": rewrites}}
    return files, variants, fp16_record


def flops_entry(raw_path: Path, component) -> dict:
    """The arithmetic of one call, counted on the exported graph (before any runtime rewrites it)."""
    from sdfast.export.flops import COUNTED_OPS, count_flops

    shapes = {t.name: t.concrete_shape(component.dynamic, "parity") for t in component.inputs}  # dynamic axes at their smallest
    return {
        "per_call": count_flops(raw_path, shapes),
        "input_shapes": {name: list(shape) for name, shape in shapes.items()},
        "counts": f"2 x multiply-accumulates of {', '.join(COUNTED_OPS)}",
    }
