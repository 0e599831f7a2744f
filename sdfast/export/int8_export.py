"""`sdfast quantize`: a selective int8 U-Net added to an fp32 engine dir, calibrated on the engine's own sampler
trajectories (its exact pipeline generating calibration prompts), checked against the fp32 graph on a held-out one."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from sdfast.errors import ExportError
from sdfast.runtime.int8_unet import INT8, ROLE

CALIBRATION_PROMPTS = (
    "a cat sitting on a windowsill, morning light",
    "mountain landscape with a lake, watercolor",
    "a bowl of ramen, food photography",
    "an astronaut riding a horse, digital art",
)
HELD_OUT_PROMPT = "a vintage car parked on a cobblestone street"  # the check's trajectory: never calibrated on
NEGATIVE = "blurry, low quality"


def record_trajectories(pipeline, prompts, seeds: range, steps: int, cfg: float = 7.5, sampler: str = "euler",
                        progress=lambda _: None) -> list[dict]:
    """The U-Net feeds of ``pipeline``'s exact sampler loop over ``prompts`` x ``seeds``."""
    from sdfast.runtime.generation import GenerationRequest

    unet = pipeline.engines[pipeline.manifest.denoiser]
    recorded, run = [], unet.run

    def recording(feeds):
        recorded.append({name: np.array(value) for name, value in feeds.items()})
        return run(feeds)

    unet.run = recording
    try:
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                pipeline.generate(GenerationRequest(prompt, NEGATIVE, steps=steps, cfg_scale=cfg, seed=seed, sampler=sampler))
                progress(f"calibration: {prompt!r}, seed {seed}: {len(recorded)} U-Net calls recorded")
    finally:
        unet.run = run
    return recorded


def build_int8_graph(source_files: dict[str, Path], graph_file: str, folder: Path, policy: str, calibration: list[dict],
                     progress=lambda _: None) -> tuple[Path, dict]:
    """``folder/unet_int8.cpu.onnx`` (and its data): the fp32 graph ``graph_file`` of ``source_files`` with its attention
    fused (MultiHeadAttention) and ``policy``'s nodes int8, saved at ORT_ENABLE_ALL for the CPU provider. Returns (its path,
    the quantization record); leaves only it and the copy of the fp32 graph (the caller's to remove) in ``folder``."""
    from sdfast.export.int8_policy import quantize_denoiser
    from sdfast.export.onnx_export import optimize_offline, rewrite_for_cpu

    for name, path in source_files.items():  # the rewrite writes beside the graph it reads
        shutil.copy(path, folder / name)
    fused = folder / "unet_int8.mha.onnx"
    progress("int8: fusing the fp32 U-Net's attention (MultiHeadAttention), inferring its shapes")
    rewrite_for_cpu(folder / graph_file, fused, winograd=False)  # direct convolutions: int8 takes them, not Winograd's
    qdq = folder / "unet_int8.qdq.onnx"
    record = quantize_denoiser(fused, qdq, calibration, policy, progress)
    progress("int8: saving the graph optimized for the CPU provider (ORT_ENABLE_ALL)")
    out = optimize_offline(qdq, folder / "unet_int8.cpu.onnx", "ORT_ENABLE_ALL")[0]
    for leftover in [*folder.glob("unet_int8.mha.onnx*"), *folder.glob("unet_int8.qdq.onnx*")]:
        leftover.unlink()
    return out, record


def relative_errors(reference: Path, candidate: Path, feeds: list[dict]) -> list[float]:
    """Relative RMS error of ``candidate``'s first output against ``reference``'s, per feed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    errors = []
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in (reference, candidate)]
    for feed in feeds:
        expected, got = (s.run(None, {spec.name: feed[spec.name] for spec in s.get_inputs()})[0] for s in sessions)
        errors.append(float(np.sqrt(np.mean((got - expected) ** 2) / max(float(np.mean(expected ** 2)), 1e-30))))
    return errors


def add_int8_unet(engine_dir: Path, policy: str, steps: int = 10, seeds: int = 1, progress=print) -> dict:
    """Quantize ``engine_dir``'s U-Net with ``policy`` and add it as ``unet_int8``; returns its manifest entry."""
    import onnxruntime

    from sdfast.export.controlnet_export import add_to_engine
    from sdfast.export.int8_policy import POLICIES
    from sdfast.export.staging import hashed
    from sdfast.runtime.backends import cpu_isa
    from sdfast.runtime.manifest import read_manifest
    from sdfast.runtime.pipeline import Pipeline

    if policy not in POLICIES:
        raise ExportError(f"int8 policy must be one of {', '.join(POLICIES)}, not '{policy}'")
    if steps < 1 or seeds < 1:
        raise ExportError("calibration needs at least one step and one seed")
    manifest = read_manifest(engine_dir)
    if manifest.denoiser != "unet":
        raise ExportError(f"int8 quantization is for U-Net families (SD 1.x, 2.x, SDXL), not a {manifest.family} {manifest.denoiser}")
    if len(manifest.sizes) > 1:
        raise ExportError("int8 quantization takes an engine dir of one size yet (this one was exported with --size)")
    unet = manifest.components["unet"]
    if unet.precision != "fp32":
        raise ExportError(f"int8 quantization starts from an fp32 engine dir, not {unet.precision}")
    started = time.perf_counter()
    pipeline = Pipeline.load(engine_dir)
    calibration = record_trajectories(pipeline, CALIBRATION_PROMPTS, range(seeds), steps, progress=progress)
    held_out = record_trajectories(pipeline, (HELD_OUT_PROMPT,), range(seeds, seeds + 1), steps)
    progress(f"held-out trajectory: {len(held_out)} U-Net calls recorded, for the check after quantization")
    del pipeline
    staging = manifest.root / ".int8-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        sources = {name: manifest.path(name) for name in unet.files}
        if unet.shared_weights:
            sources.update({name: manifest.path(name) for name in unet.shared_weights["files"]})
        graph, record = build_int8_graph(sources, unet.file, staging, policy, calibration, progress)
        errors = relative_errors(staging / unet.file, graph, held_out)
        for name in sources:
            (staging / name).unlink(missing_ok=True)
        record["error_vs_fp32"] = {"relative_rms_median": float(np.median(errors)), "relative_rms_max": float(np.max(errors)),
                                   "calls": len(errors), "trajectory": f"{HELD_OUT_PROMPT!r}, {steps} Euler steps, cfg 7.5"}
        progress(f"int8 ({policy}): relative RMS error against the fp32 U-Net on a held-out trajectory: median "
                 f"{record['error_vs_fp32']['relative_rms_median']:.3f}, max {record['error_vs_fp32']['relative_rms_max']:.3f}")
        files = sorted(p for p in staging.iterdir() if p.is_file())
        raw = manifest.data["components"]["unet"]
        entry = {
            "role": ROLE, "optional": True, "file": graph.name, "files": hashed(staging, files),
            "inputs": raw["inputs"], "outputs": raw["outputs"], "precision": "int8", "opset": raw.get("opset"),
            "int8": record, "optimization": {"tool": "onnxruntime", "level": "ORT_ENABLE_ALL", "for": "CPUExecutionProvider only",
                                             "onnxruntime": onnxruntime.__version__, "isa": cpu_isa()},
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        add_to_engine(manifest, INT8, entry, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry
