"""`sdfast quantize`: a selective int8 U-Net added to an fp32 engine dir, calibrated on the engine's own sampler
trajectories (its exact pipeline generating calibration prompts), checked against the fp32 graph on a held-out one.
An engine dir with step caching also gets an int8 shallow U-Net, calibrated on the cached steps those trajectories make."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sdfast.errors import ExportError
from sdfast.runtime.int8_unet import INT8, ROLE, SHALLOW_INT8, SHALLOW_ROLE
from sdfast.runtime.step_cache import FEATURE, SHALLOW

CALIBRATION_PROMPTS = (
    "a cat sitting on a windowsill, morning light",
    "mountain landscape with a lake, watercolor",
    "a bowl of ramen, food photography",
    "an astronaut riding a horse, digital art",
)
HELD_OUT_PROMPT = "a vintage car parked on a cobblestone street"  # the check's trajectory: never calibrated on
NEGATIVE = "blurry, low quality"


def record_trajectories(pipeline, prompts, seeds: range, steps: int, cfg: float = 7.5, sampler: str = "euler",
                        progress=lambda _: None, features: list | None = None) -> list[dict]:
    """The U-Net feeds of ``pipeline``'s exact sampler loop over ``prompts`` x ``seeds``; each call's step-cache feature
    output appended to ``features`` when a list is given (an engine exported with --step-cache)."""
    from sdfast.runtime.generation import GenerationRequest

    unet = pipeline.engines[pipeline.manifest.denoiser]
    recorded, run = [], unet.run
    feature_index = [spec.name for spec in unet.info.outputs].index(FEATURE) if features is not None else None

    def recording(feeds):
        # the arrays themselves, not copies: each call's sample is new, and the conditioning (the ControlNet inputs' zeros
        # above all) is one array shared by every call of a request
        recorded.append(dict(feeds))
        outputs = run(feeds)
        if feature_index is not None:
            features.append(outputs[feature_index])  # feature: [2B, C, h, w]
        return outputs

    unet.run = recording
    try:
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                pipeline.generate(GenerationRequest(prompt, NEGATIVE, steps=steps, cfg_scale=cfg, seed=seed, sampler=sampler))
                progress(f"calibration: {prompt!r}, seed {seed}: {len(recorded)} U-Net calls recorded")
    finally:
        unet.run = run
    return recorded


def cached_step_feeds(feeds: list[dict], features: list, steps: int, inputs: list[str]) -> list[dict]:
    """The shallow U-Net's feeds on the cached steps of DeepCache's schedule: each call's inputs with the feature of the
    call before it in the same trajectory (``feeds`` holds whole trajectories of ``steps`` calls each)."""
    if len(feeds) % steps or len(features) != len(feeds):
        raise ExportError(f"{len(feeds)} recorded U-Net calls are not whole trajectories of {steps} steps")
    return [{**{name: feeds[call][name] for name in inputs}, FEATURE: features[call - 1]}
            for start in range(0, len(feeds), steps) for call in range(start + 1, start + steps)]


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


def add_int8_unet(engine_dir: Path, policy: str, steps: int = 10, seeds: int = 1, progress=print) -> dict[str, dict]:
    """Quantize ``engine_dir``'s U-Net with ``policy`` and add it as ``unet_int8`` (and its shallow U-Net as
    ``unet_shallow_int8`` when it has one); returns the manifest entries written, by component."""
    from sdfast.export.engine_additions import add_to_engine
    from sdfast.export.int8_policy import POLICIES
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
    shallow = manifest.components.get(SHALLOW)
    if shallow is not None and FEATURE not in [spec.name for spec in unet.outputs]:
        shallow = None  # a shallow U-Net without its feature (not an engine dir export writes): no cached steps to quantize
    if shallow is not None and steps < 2:
        raise ExportError("calibrating the int8 shallow U-Net needs at least 2 steps (a cached step follows a full one)")
    started = time.perf_counter()
    pipeline = Pipeline.load(engine_dir)
    cfg = pipeline.checker.default_cfg_scale  # 1 for an engine exported without guidance (Turbo, LCM)
    features, held_out_features = ([], []) if shallow else (None, None)
    calibration = record_trajectories(pipeline, CALIBRATION_PROMPTS, range(seeds), steps, cfg, progress=progress, features=features)
    held_out = record_trajectories(pipeline, (HELD_OUT_PROMPT,), range(seeds, seeds + 1), steps, cfg, features=held_out_features)
    progress(f"held-out trajectory: {len(held_out)} U-Net calls recorded, for the check after quantization")
    del pipeline
    trajectory = f"{HELD_OUT_PROMPT!r}, {steps} Euler steps, cfg {cfg:g}"
    # a staging folder and file names of this run's own: a second quantize of the same dir, or a failed rewrite of the
    # manifest, never touches the files the manifest lists (add_to_engine removes the replaced ones after the rewrite)
    staging = Path(tempfile.mkdtemp(prefix=".int8-", dir=manifest.root))
    token = staging.name.removeprefix(".int8-").lower()
    try:
        entries = {INT8: _quantized_entry(manifest, unet, ROLE, policy, calibration, held_out, trajectory, staging,
                                          f"{INT8}.{token}", progress)}
        if shallow is not None:
            inputs = [spec.name for spec in shallow.inputs if spec.name != FEATURE]
            progress("int8: the shallow U-Net of step caching, calibrated on each step's inputs with the step before's feature")
            # (lag 1, from the fp32 U-Net: a cached step at interval N sees a feature 1 to N-1 steps old, from the int8 U-Net)
            entries[SHALLOW_INT8] = _quantized_entry(
                manifest, shallow, SHALLOW_ROLE, policy, cached_step_feeds(calibration, features, steps, inputs),
                cached_step_feeds(held_out, held_out_features, steps, inputs), trajectory + ", cached steps", staging,
                f"{SHALLOW_INT8}.{token}", progress)
        for entry in entries.values():
            entry["export_seconds"] = round(time.perf_counter() - started, 1)
        stale = {SHALLOW_INT8: None} if SHALLOW_INT8 in manifest.components and SHALLOW_INT8 not in entries else {}
        add_to_engine(manifest, {**entries, **stale}, staging)  # an old shallow twin does not outlive its U-Net
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entries


def _quantized_entry(manifest, component, role: str, policy: str, calibration: list[dict], held_out: list[dict],
                     trajectory: str, staging: Path, stem: str, progress) -> dict:
    """``component`` (the U-Net or its shallow branch) quantized with ``policy`` into ``staging``: its manifest entry,
    with its relative RMS error against the fp32 graph on the held-out feeds."""
    import onnxruntime

    from sdfast.export.staging import hashed
    from sdfast.runtime.backends import cpu_isa

    sources = {name: manifest.path(name) for name in component.files}
    if component.shared_weights:
        sources.update({name: manifest.path(name) for name in component.shared_weights["files"]})
    portable, graph, record = build_int8_graph(sources, component.file, staging, policy, calibration, progress, stem)
    errors = relative_errors(staging / component.file, graph, held_out)
    for name in sources:
        (staging / name).unlink(missing_ok=True)
    record["error_vs_fp32"] = {"relative_rms_median": float(np.median(errors)), "relative_rms_max": float(np.max(errors)),
                               "calls": len(errors), "trajectory": trajectory}
    progress(f"int8 ({policy}): {component.name}'s relative RMS error against fp32 on a held-out trajectory: median "
             f"{record['error_vs_fp32']['relative_rms_median']:.3f}, max {record['error_vs_fp32']['relative_rms_max']:.3f}")
    raw = manifest.data["components"][component.name]
    return {
        "role": role, "optional": True, "file": portable.name, "files": hashed(staging, sorted(staging.glob(portable.name + "*"))),
        "inputs": raw["inputs"], "outputs": raw["outputs"], "precision": "int8", "opset": raw.get("opset"), "int8": record,
        "optimization": {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ with com.microsoft MultiHeadAttention",
                         "for": "onnxruntime"},
        # what the CPU provider loads when its onnxruntime version and vector ISA are these (else the QDQ graph above)
        "variants": {"cpu": {"file": graph.name, "files": hashed(staging, sorted(staging.glob(graph.name + "*"))), "optimization": {
            "tool": "onnxruntime", "level": "ORT_ENABLE_ALL", "for": "CPUExecutionProvider", "onnxruntime": onnxruntime.__version__,
            "isa": cpu_isa()}}},
    }
