"""sdfast quantize: a selective int8 U-Net added to an fp32 engine dir (``generate --int8`` runs it), and its shallow
U-Net's int8 twin where the engine dir has step caching (``generate --int8 --step-cache N``)."""
from __future__ import annotations

import argparse
from pathlib import Path

POLICIES = ("linear+conv", "linear")  # sdfast.export.int8_policy.POLICIES, without importing onnx for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine", type=Path, help="an fp32 engine dir of a U-Net family (SD 1.x, 2.x, SDXL), one size")
    parser.add_argument("--policy", choices=POLICIES, default="linear+conv",
                        help="linear+conv (default): the transformer blocks' linear layers and the convolutions int8; linear: "
                             "the linear layers only. Always fp32: the attention scores, the first and last convolutions, the "
                             "time embedding, the prompt's key/value projections and the residual shortcuts")
    parser.add_argument("--steps", type=int, default=10, help="Euler steps of each calibration run, at the engine's default "
                                                               "cfg scale (default 10)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per calibration prompt (4 prompts; default 1)")


def run(args: argparse.Namespace) -> int:
    from sdfast.cli.progress import ElapsedLog
    from sdfast.errors import ExportError

    if not (args.engine / "manifest.json").is_file():
        raise ExportError(f"{args.engine} is not an engine dir (no manifest.json)")
    from sdfast.export.int8_export import add_int8_unet

    entries = add_int8_unet(args.engine, args.policy, args.steps, args.seeds, ElapsedLog("quantize"))
    for name, entry in entries.items():
        error, shallow = entry["int8"]["error_vs_fp32"], name == "unet_shallow_int8"
        print(f"{args.engine}: {name} ({args.policy}, {entry['int8']['quantized']} nodes int8), relative RMS error against the "
              f"fp32 {'shallow ' if shallow else ''}U-Net {error['relative_rms_median']:.3f} (max {error['relative_rms_max']:.3f}); "
              f"{'generate --int8 --step-cache N runs both' if shallow else 'generate --int8 runs it'}")
    return 0
