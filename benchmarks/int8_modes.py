"""Selective static int8 of the U-Net: its speed per image and its quality cost (PSNR, SSIM) against the exact image.

    python benchmarks/int8_modes.py ENGINE_DIR --steps 10 --seeds 2 --policies "linear;linear+conv" \
        --work /tmp/int8-work --out benchmarks/results/int8_modes_sd15_256.json

ENGINE_DIR: an fp32 engine dir with the CPU variant (`sdfast export ... --precision fp32`). For each policy
(sdfast.export.int8_policy), the int8 graph is built as `sdfast quantize` builds it (sdfast.export.int8_export: the
U-Net's attention fused, the policy's nodes quantized by onnxruntime's quantize_static, calibrated on the U-Net calls
of the exact pipeline generating other prompts and seeds than the ones measured, saved at ORT_ENABLE_ALL), and
replaces the U-Net of the same loaded pipeline, so every other stage is shared.
Images alternate between the exact U-Net and each policy, as benchmarks/fast_modes.py does, and its table format is
used. With random weights the images are noise-like: a trained model's quality cost must be measured on that model.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast_modes import NEGATIVE, PROMPTS, _cpu_name, add_run_arguments, markdown, ssim, summary  # noqa: E402

from sdfast.export.int8_export import CALIBRATION_PROMPTS, build_int8_graph, record_trajectories  # noqa: E402
from sdfast.runtime.generation import GenerationRequest  # noqa: E402
from sdfast.runtime.images import psnr  # noqa: E402
from sdfast.runtime.pipeline import Pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, seeds=2)
    parser.add_argument("--calibration-seeds", type=int, default=1)
    parser.add_argument("--policies", default="linear;linear+conv")
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (a copy of the U-Net, and each int8 graph)")
    parser.add_argument("--out", type=Path, help="JSON results (and a .md table beside it)")
    args = parser.parse_args()
    import onnxruntime as ort

    args.work.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline.load(args.engine, verify="size")
    started = time.perf_counter()
    calibration = record_trajectories(pipeline, CALIBRATION_PROMPTS, range(1000, 1000 + args.calibration_seeds), args.steps,
                                      args.cfg, args.sampler)
    print(f"recorded {len(calibration)} U-Net calls in {time.perf_counter() - started:.0f} s", flush=True)
    unet = pipeline.engines[pipeline.manifest.denoiser]
    exact_run = unet.run
    options = ort.SessionOptions()
    options.log_severity_level = 3
    modes, records = {"exact": exact_run}, {}
    for policy in (p.strip() for p in args.policies.split(";") if p.strip()):
        started = time.perf_counter()
        folder = args.work / policy.replace("+", "_")
        folder.mkdir(exist_ok=True)
        component = pipeline.manifest.components[pipeline.manifest.denoiser]
        sources = {name: pipeline.manifest.path(name) for name in component.files}
        if component.shared_weights:  # a U-Net over a shared weights file (export --guidance-truncation or --size)
            sources.update({name: pipeline.manifest.path(name) for name in component.shared_weights["files"]})
        _, path, records[policy] = build_int8_graph(sources, component.file, folder, policy, calibration)
        for name in sources:
            (folder / name).unlink()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {spec.name for spec in session.get_inputs()}
        modes[f"int8 {policy}"] = lambda feeds, session=session, names=names: session.run(
            None, {name: value for name, value in feeds.items() if name in names})
        print(f"int8 {policy}: built in {time.perf_counter() - started:.0f} s ({records[policy]['quantized']} nodes)", flush=True)
    del calibration

    labels = list(modes)
    seconds = {label: [] for label in labels}
    unet_seconds = {label: [] for label in labels}
    quality = {label: {"psnr": [], "ssim": []} for label in labels if label != "exact"}
    for image_index, (prompt, seed) in enumerate((p, s) for p in PROMPTS[: args.prompts] for s in range(args.seeds)):
        images = {}
        for label in labels[image_index % len(labels):] + labels[: image_index % len(labels)]:  # rotate: alternate the modes
            unet.run = modes[label]
            result = pipeline.generate(GenerationRequest(prompt, NEGATIVE, steps=args.steps, cfg_scale=args.cfg, seed=seed,
                                                         sampler=args.sampler))
            seconds[label].append(result.timings.total)
            unet_seconds[label].append(sum(result.timings.unet_steps))
            images[label] = result.images[0]
        unet.run = exact_run
        for label in quality:
            quality[label]["psnr"].append(psnr(images[label], images["exact"]))
            quality[label]["ssim"].append(ssim(images[label], images["exact"]))
        print(f"[{image_index + 1}/{args.prompts * args.seeds}] " + ", ".join(
            f"{label} {seconds[label][-1]:.2f} s" + (f" {quality[label]['psnr'][-1]:.1f} dB" if label in quality else "")
            for label in labels), flush=True)

    exact = np.array(seconds["exact"])
    rows = {label: {
        "image_s": summary(seconds[label]), "unet_s": summary(unet_seconds[label]),
        "unet_speedup_vs_exact": summary((np.array(unet_seconds["exact"]) / np.array(unet_seconds[label])).tolist()),
        "speedup_vs_exact": summary((exact / np.array(seconds[label])).tolist()),
        **({"psnr_db": summary(quality[label]["psnr"]), "ssim": summary(quality[label]["ssim"])} if label in quality else {}),
        **({"quantization": records[label.removeprefix("int8 ")]} if label != "exact" else {}),
    } for label in labels}
    report = {
        "benchmark": "int8_modes", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                                                   "onnxruntime": ort.__version__},
        "engine": str(args.engine), "model": pipeline.manifest.model_name, "family": pipeline.manifest.family,
        "random_weights": bool(pipeline.manifest.data["source"].get("random_weights")),
        "size": f"{pipeline.width}x{pipeline.height}", "steps": args.steps, "sampler": args.sampler, "cfg": args.cfg,
        "images_per_mode": len(exact), "calibration": {"prompts": CALIBRATION_PROMPTS, "seeds": args.calibration_seeds},
        "modes": rows,
    }
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
