"""fp16 image quality: PSNR of an fp16 engine's images against the fp32 engine's on the CPU, same seeds and sampler.

    python benchmarks/fp16_psnr.py --fp32 ENGINE_DIR --fp16 ENGINE_DIR [--backend cpu|cuda|tensorrt] [--steps 20] [--seeds 3]

The reference is always the fp32 engine on the cpu backend with the numpy samplers; the fp16 engine runs on
--backend (with its device loop on a GPU). Writes benchmarks/results/fp16_psnr_<size>_<backend>.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPT = "a photograph of an astronaut riding a horse"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, required=True, help="the fp32 engine dir (the reference, on the CPU)")
    parser.add_argument("--fp16", type=Path, required=True, help="the fp16 engine dir of the same model and size")
    parser.add_argument("--backend", default="cpu", help="where the fp16 engine runs (default cpu)")
    parser.add_argument("--sampler", default="euler_a")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from sdfast.runtime.images import psnr
    from sdfast.runtime.pipeline import GenerationRequest, Pipeline

    reference = Pipeline.load(args.fp32, backend="cpu", verify="size", loop="numpy")
    ours = Pipeline.load(args.fp16, backend=args.backend, verify="size")
    rows = []
    for seed in range(args.seeds):
        request = GenerationRequest(prompt=PROMPT, steps=args.steps, seed=seed, sampler=args.sampler)
        expected, got = reference.generate(request), ours.generate(request)
        latent_rel = float(np.abs(got.latents - expected.latents).max() / np.abs(expected.latents).max())
        rows.append({"seed": seed, "psnr_db": psnr(got.images, expected.images), "latent_max_rel": latent_rel})
        print(f"seed {seed}: PSNR {rows[-1]['psnr_db']:.1f} dB, latents max rel {latent_rel:.2e}", file=sys.stderr, flush=True)
    values = sorted(r["psnr_db"] for r in rows)
    record = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/fp16_psnr.py " + " ".join(sys.argv[1:]),
        "machine": platform.platform(),
        "workload": {"width": ours.width, "height": ours.height, "sampler": args.sampler, "steps": args.steps, "prompt": PROMPT,
                     "weights": "random" if ours.manifest.data["source"]["random_weights"] else ours.manifest.model_name},
        "backend": args.backend,
        "fp16_components": {n: c["precision"] for n, c in ours.manifest.data["components"].items()},
        "psnr_db": {"median": values[len(values) // 2], "min": values[0], "max": values[-1]},
        "per_seed": rows,
    }
    out = args.out or HERE / "results" / f"fp16_psnr_{ours.width}x{ours.height}_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["psnr_db"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
