"""End-to-end parity with diffusers: sdfast's fp32 CPU image against StableDiffusionPipeline's.

    python benchmarks/parity.py [--model sd15|tiny] [--engine DIR] [--size 256] [--steps 20] [--sampler euler] [--seed 42] [--json FILE]

Builds the built-in model (random weights) and exports it to engines/MODEL-SIZE if --engine is not
given, runs diffusers and sdfast with the same seed, sampler and steps, and prints the PSNR.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

SCHEDULERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=("sd15", "tiny"), help="built-in model (default sd15)")
    parser.add_argument("--engine", type=Path, help="an engine dir of that model (default: export one to engines/MODEL-SIZE)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="euler", choices=sorted(SCHEDULERS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    import diffusers
    import torch

    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.export.builtin import ensure_builtin
    from sdfast.runtime.images import psnr
    from sdfast.runtime.pipeline import GenerationRequest, Pipeline

    folder = ensure_builtin(args.model, print)
    engine = args.engine or Path(f"engines/{args.model}-{args.size}")
    if not (engine / "manifest.json").exists():
        export_engine(ExportRequest(model=args.model, out=engine, height=args.size, width=args.size), print)
    prompt, negative = "a red apple on a table", "blurry"

    sdfast_pipeline = Pipeline.load(engine)
    started = time.perf_counter()
    ours = sdfast_pipeline.generate(GenerationRequest(prompt, negative, steps=args.steps, cfg_scale=args.cfg, seed=args.seed, sampler=args.sampler))
    ours_s = time.perf_counter() - started

    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    reference.scheduler = getattr(diffusers, SCHEDULERS[args.sampler]).from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    with torch.inference_mode():
        theirs = reference(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                           height=sdfast_pipeline.height, width=sdfast_pipeline.width,
                           generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np").images
    theirs_s = time.perf_counter() - started
    theirs = (theirs * 255).round().astype(np.uint8)

    difference = np.abs(ours.images.astype(int) - theirs.astype(int))
    value = psnr(ours.images, theirs)
    print(f"{args.model} (random weights) {sdfast_pipeline.width}x{sdfast_pipeline.height}, {args.sampler}, {args.steps} steps, cfg {args.cfg}, seed {args.seed}")
    print(f"PSNR sdfast vs diffusers: {value:.2f} dB (max pixel difference {difference.max()}, "
          f"pixels differing {np.count_nonzero(difference)} of {difference.size}; image std {ours.images.std():.1f})")
    print(f"wall time: sdfast {ours_s:.1f} s, diffusers eager {theirs_s:.1f} s (one run each, not a benchmark)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"processor": platform.processor() or platform.machine(), "platform": platform.platform()},
            "model": args.model, "size": sdfast_pipeline.width, "sampler": args.sampler, "steps": args.steps, "cfg": args.cfg,
            "seed": args.seed, "psnr_db": None if value == float("inf") else value, "identical": bool(difference.max() == 0),
            "max_pixel_difference": int(difference.max()), "pixels_differing": int(np.count_nonzero(difference)),
            "image_std": float(ours.images.std()), "wall_s": {"sdfast": ours_s, "diffusers_eager": theirs_s},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
