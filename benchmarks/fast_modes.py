"""Fast modes against the exact image: the speed-up per image and the quality cost (PSNR, SSIM) over seeds x prompts.

    python benchmarks/fast_modes.py ENGINE_DIR --steps 10 --seeds 8 \
        --modes "step_cache=2;step_cache=3;step_cache=4;vae_decoder=tiny;step_cache=3,vae_decoder=tiny" \
        --out benchmarks/results/fast_modes_sd15_256.json

Every image is generated once per mode, the modes alternating (their order rotates from image to image), so the speed
ratios come from one interleaved run on a shared machine. Quality is measured against sdfast's exact image of the same
seed and prompt: PSNR (sdfast.runtime.images.psnr) and SSIM (scikit-image's structural_similarity, Wang et al. 2004).
With random weights the images are noise-like; a trained model's quality cost must be measured on that model.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdfast.runtime.generation import GenerationRequest  # noqa: E402
from sdfast.runtime.images import psnr  # noqa: E402
from sdfast.runtime.pipeline import Pipeline  # noqa: E402

PROMPTS = [
    "a red apple on a wooden table, studio light",
    "a lighthouse on a cliff at dusk, oil painting",
    "portrait of an old fisherman, detailed face, 85mm photo",
    "a futuristic city street in the rain, neon signs",
]
NEGATIVE = "blurry, low quality"


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two [H, W, 3] uint8 images (scikit-image, Gaussian 11x11 window as Wang et al. 2004)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


LABELS = {"step_cache": "step cache {}", "vae_decoder": "{} VAE", "guidance_stop": "guidance stop {}", "int8": "int8 U-Net"}


def modes_from(text: str) -> dict[str, dict]:
    """'step_cache=3;vae_decoder=tiny;int8;step_cache=3,vae_decoder=tiny' -> mode label -> the GenerationRequest fields it
    sets; 'exact' (no field) first."""
    modes = {"exact": {}}
    for mode in (m.strip() for m in text.split(";") if m.strip()):
        fields = {}
        for pair in mode.split(","):
            key, _, value = pair.strip().partition("=")
            if key not in LABELS:
                raise SystemExit(f"--modes: unknown field '{key}' (one of {', '.join(LABELS)})")
            if not value and key != "int8":
                raise SystemExit(f"--modes: '{key}' needs a value ({key}=...)")
            fields[key] = (True if not value else int(value) if value.isdigit() else
                           float(value) if value.replace(".", "", 1).isdigit() else value)  # a bare 'int8' switches it on
        modes[" + ".join(LABELS[key].format(value) for key, value in fields.items())] = fields
    return modes


def summary(values: list[float]) -> dict:
    finite = [v for v in values if np.isfinite(v)]
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "mean_finite": float(np.mean(finite)) if finite else None, "n": len(values)}


def add_run_arguments(parser: argparse.ArgumentParser, seeds: int) -> None:
    """The engine dir and the images measured: steps, sampler, cfg, seeds x prompts (shared with int8_modes.py)."""
    parser.add_argument("engine", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, seeds=8)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--modes", default="step_cache=2;step_cache=3;step_cache=4",
                        help="the fast modes, ';'-separated, each 'field=value[,field=value]' of GenerationRequest (step_cache, "
                             "vae_decoder, guidance_stop, int8: a bare 'int8' is int8=True); the exact image is always measured")
    parser.add_argument("--out", type=Path, help="JSON results (and a .md table beside it)")
    args = parser.parse_args()

    started = time.perf_counter()
    pipeline = Pipeline.load(args.engine, verify="size")
    load_s = time.perf_counter() - started
    modes = modes_from(args.modes)
    for overrides in modes.values():  # refuse a mode the engine dir cannot run before any image is made
        pipeline.validate(GenerationRequest("x", steps=args.steps, width=args.width, height=args.height, **overrides))
    seconds = {label: [] for label in modes}
    unet_seconds = {label: [] for label in modes}
    quality = {label: {"psnr": [], "ssim": []} for label in modes if label != "exact"}
    labels = list(modes)
    for image_index, (prompt, seed) in enumerate((p, s) for p in PROMPTS[: args.prompts] for s in range(args.seeds)):
        order = labels[image_index % len(labels):] + labels[: image_index % len(labels)]  # rotate: alternate the modes
        images = {}
        for label in order:
            request = GenerationRequest(prompt, NEGATIVE, steps=args.steps, cfg_scale=args.cfg, seed=seed, sampler=args.sampler,
                                        width=args.width, height=args.height, **modes[label])
            result = pipeline.generate(request)
            seconds[label].append(result.timings.total)
            unet_seconds[label].append(sum(result.timings.unet_steps))
            images[label] = result.images[0]
        for label in quality:
            quality[label]["psnr"].append(psnr(images[label], images["exact"]))
            quality[label]["ssim"].append(ssim(images[label], images["exact"]))
        line = ", ".join(f"{label} {seconds[label][-1]:.2f} s" for label in labels)
        print(f"[{image_index + 1}/{args.prompts * args.seeds}] seed {seed}: {line}", flush=True)

    exact = np.array(seconds["exact"])
    rows = {}
    for label in modes:
        per_image = np.array(seconds[label])
        rows[label] = {
            "fields": modes[label],
            "image_s": summary(per_image.tolist()),
            "unet_s": summary(unet_seconds[label]),
            "speedup_vs_exact": summary((exact / per_image).tolist()),  # per image, the pair measured back to back
            **({"psnr_db": summary(quality[label]["psnr"]), "ssim": summary(quality[label]["ssim"])} if label in quality else {}),
        }
    report = {
        "benchmark": "fast_modes", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "machine": {"platform": platform.platform(), "processor": _cpu_name()},
        "engine": str(args.engine), "model": pipeline.manifest.model_name, "family": pipeline.manifest.family,
        "random_weights": bool(pipeline.manifest.data["source"].get("random_weights")),
        "size": f"{args.width or pipeline.width}x{args.height or pipeline.height}", "steps": args.steps, "sampler": args.sampler,
        "cfg": args.cfg, "images_per_mode": len(exact), "load_s": load_s, "modes": rows,
    }
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    return 0


def markdown(report: dict) -> str:
    head = (f"{report['model']} ({'random weights' if report['random_weights'] else 'trained weights'}), {report['size']}, "
            f"{report['steps']} {report['sampler']} steps, cfg {report['cfg']}, {report['images_per_mode']} images per mode "
            f"(seeds x prompts), modes alternating; {report['date']}")
    lines = [head, "", "| mode | s per image, median (min-max) | speed-up vs exact, median (min-max) | PSNR vs exact, dB, median (min-max) | SSIM, median (min) |",
             "|---|---|---|---|---|"]
    for label, row in report["modes"].items():
        image, up = row["image_s"], row["speedup_vs_exact"]
        quality = ("-", "-") if "psnr_db" not in row else (
            f"{row['psnr_db']['median']:.1f} ({row['psnr_db']['min']:.1f}-{row['psnr_db']['max']:.1f})",
            f"{row['ssim']['median']:.3f} ({row['ssim']['min']:.3f})")
        lines.append(f"| {label} | {image['median']:.2f} ({image['min']:.2f}-{image['max']:.2f}) | "
                     f"{up['median']:.2f}x ({up['min']:.2f}-{up['max']:.2f}) | {quality[0]} | {quality[1]} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
