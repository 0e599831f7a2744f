"""SD3's --t5 options side by side: each one's embedding error against PyTorch fp32 and the image PSNR it causes.

    python benchmarks/t5_options.py [--model tiny-sd3-t5] [--steps 8] [--seeds 3]

For each option (fp32, fp16, int8, and none for scale) the model is exported, the T5 encoder's parity against
PyTorch fp32 is read from the manifest (max_rel over the T5 embeddings of a random prompt), and images are generated
for a few seeds and compared with diffusers' StableDiffusion3Pipeline running T5 in fp32. Results go to
benchmarks/results/t5_options_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT, NEGATIVE = "a lighthouse on a cliff at dawn, oil painting", "blurry"
OPTIONS = ("fp32", "fp16", "int8", "none")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd3-t5", help="a built-in SD3 model with T5, or an SD3 folder with text_encoder_3")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="images per option (seeds 0..N-1)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch
    import diffusers

    from sdfast.export.build import ExportRequest, export_engine
    from sdfast.export.builtin import BUILTIN_MODELS, ensure_builtin
    from sdfast.runtime.images import psnr
    from sdfast.runtime.manifest import read_manifest
    from sdfast.runtime.pipeline import GenerationRequest, Pipeline

    folder = ensure_builtin(args.model, print) if args.model in BUILTIN_MODELS else Path(args.model)
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, image_encoder=None, feature_extractor=None)
    reference.set_progress_bar_config(disable=True)
    size = int(reference.transformer.config.sample_size) * 8
    expected = []
    for seed in range(args.seeds):
        images = reference(PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=args.steps, guidance_scale=5.0,
                           generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
        expected.append((images * 255).round().astype(np.uint8))
    del reference
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for option in OPTIONS:
            print(f"t5_options: exporting with --t5 {option}", file=sys.stderr)
            engine = export_engine(ExportRequest(model=args.model, out=Path(scratch) / option, t5=option, cpu_variant=False))
            manifest = read_manifest(engine)
            parity = manifest.data["components"].get("text_encoder_3", {}).get("parity")
            pipeline = Pipeline.load(engine)
            scores = [psnr(pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=args.steps, cfg_scale=5.0, seed=seed,
                                                               sampler="Euler")).images, expected[seed]) for seed in range(args.seeds)]
            t5_bytes = sum(f["bytes"] for f in manifest.data["components"].get("text_encoder_3", {}).get("files", {}).values())
            rows[option] = {"embedding_max_rel": parity["max_rel"] if parity else None, "embedding_max_abs": parity["max_abs"] if parity else None,
                            "image_psnr_db_median": statistics.median(scores), "image_psnr_db_min": min(scores),
                            "image_psnr_db_max": max(scores), "t5_file_bytes": t5_bytes}
    record = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/t5_options.py " + " ".join(sys.argv[1:]), "machine": platform.processor() or platform.machine(),
              "model": args.model, "steps": args.steps, "seeds": args.seeds, "reference": "diffusers StableDiffusion3Pipeline, T5 in fp32",
              "options": rows}
    out = args.out or HERE / "results" / f"t5_options_{args.model}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"### --t5 options on {args.model}: T5 embedding error and image PSNR against diffusers (T5 fp32)", "",
             f"{record['date']}; `{record['command']}`; {args.steps} Euler steps, cfg 5, seeds 0..{args.seeds - 1}", "",
             "| --t5 | embedding max_rel vs PyTorch fp32 | image PSNR dB, median (min-max) | T5 file bytes |", "|---|---:|---:|---:|"]
    for option, row in rows.items():
        error = f"{row['embedding_max_rel']:.2e}" if row["embedding_max_rel"] is not None else "- (zeros in T5's place)"
        lines.append(f"| {option} | {error} | {row['image_psnr_db_median']:.1f} ({row['image_psnr_db_min']:.1f}-{row['image_psnr_db_max']:.1f}) "
                     f"| {row['t5_file_bytes']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
