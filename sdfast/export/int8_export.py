"""`sdfast quantize`: a selective int8 U-Net added to an fp32 engine dir, calibrated on the engine's own sampler
trajectories (its exact pipeline generating calibration prompts), checked against the fp32 graph on a held-out one."""
from __future__ import annotations

import shutil
import tempfile
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
        # the arrays themselves, not copies: each call's sample is new, and the conditioning (the ControlNet inputs' zeros
        # above all) is one array shared by every call of a request
        recorded.append(dict(feeds))
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
                     progress=lambda _: None, stem: str = "unet_int8") -> tuple[Path, Path, dict]:
    """The fp32 graph ``graph_file`` of ``source_files`` with its attention fused (MultiHeadAttention) and ``policy``'s
    nodes int8: ``folder/{stem}.onnx`` (QDQ, for any onnxruntime) and ``folder/{stem}.cpu.onnx`` (saved at ORT_ENABLE_ALL
    for this CPU and onnxruntime version), each with its data. Returns (the two paths, the quantization record); leaves
    them and the copy of the fp32 graph (the caller's to remove) in ``folder``."""
    from sdfast.export.int8_policy import quantize_denoiser
    from sdfast.export.onnx_export import optimize_offline, rewrite_for_cpu

    for name, path in source_files.items():  # the rewrite writes beside the graph it reads
        shutil.copy(path, folder / name)
    fused = folder / f"{stem}.mha.onnx"
    progress("int8: fusing the fp32 U-Net's attention (MultiHeadAttention), inferring its shapes")
    rewrite_for_cpu(folder / graph_file, fused, winograd=False)  # direct convolutions: int8 takes them, not Winograd's
    qdq = folder / f"{stem}.onnx"
    record = quantize_denoiser(fused, qdq, calibration, policy, progress)
    progress("int8: saving the graph optimized for the CPU provider (ORT_ENABLE_ALL)")
    cpu = optimize_offline(qdq, folder / f"{stem}.cpu.onnx", "ORT_ENABLE_ALL")[0]
    for leftover in folder.glob(f"{stem}.mha.onnx*"):
        leftover.unlink()
    return qdq, cpu, record


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
    cfg = pipeline.checker.default_cfg_scale  # 1 for an engine exported without guidance (Turbo, LCM)
    calibration = record_trajectories(pipeline, CALIBRATION_PROMPTS, range(seeds), steps, cfg, progress=progress)
    held_out = record_trajectories(pipeline, (HELD_OUT_PROMPT,), range(seeds, seeds + 1), steps, cfg)
    progress(f"held-out trajectory: {len(held_out)} U-Net calls recorded, for the check after quantization")
    del pipeline
    # a staging folder and file names of this run's own: a second quantize of the same dir, or a failed rewrite of the
    # manifest, never touches the files the manifest lists (add_to_engine removes the replaced ones after the rewrite)
    staging = Path(tempfile.mkdtemp(prefix=".int8-", dir=manifest.root))
    stem = f"unet_int8.{staging.name.removeprefix('.int8-').lower()}"
    try:
        sources = {name: manifest.path(name) for name in unet.files}
        if unet.shared_weights:
            sources.update({name: manifest.path(name) for name in unet.shared_weights["files"]})
        portable, graph, record = build_int8_graph(sources, unet.file, staging, policy, calibration, progress, stem)
        errors = relative_errors(staging / unet.file, graph, held_out)
        for name in sources:
            (staging / name).unlink(missing_ok=True)
        record["error_vs_fp32"] = {"relative_rms_median": float(np.median(errors)), "relative_rms_max": float(np.max(errors)),
                                   "calls": len(errors), "trajectory": f"{HELD_OUT_PROMPT!r}, {steps} Euler steps, cfg {cfg:g}"}
        progress(f"int8 ({policy}): relative RMS error against the fp32 U-Net on a held-out trajectory: median "
                 f"{record['error_vs_fp32']['relative_rms_median']:.3f}, max {record['error_vs_fp32']['relative_rms_max']:.3f}")
        raw = manifest.data["components"]["unet"]
        entry = {
            "role": ROLE, "optional": True, "file": portable.name, "files": hashed(staging, sorted(staging.glob(portable.name + "*"))),
            "inputs": raw["inputs"], "outputs": raw["outputs"], "precision": "int8", "opset": raw.get("opset"), "int8": record,
            "optimization": {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ with com.microsoft MultiHeadAttention",
                             "for": "onnxruntime"},
            # what the CPU provider loads when its onnxruntime version and vector ISA are these (else the QDQ graph above)
            "variants": {"cpu": {"file": graph.name, "files": hashed(staging, sorted(staging.glob(graph.name + "*"))), "optimization": {
                "tool": "onnxruntime", "level": "ORT_ENABLE_ALL", "for": "CPUExecutionProvider", "onnxruntime": onnxruntime.__version__,
                "isa": cpu_isa()}}},
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        add_to_engine(manifest, INT8, entry, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry
