"""sdfast export: a diffusers folder or built-in model -> engine dir."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sdfast.export.builtin import BUILTIN_MODELS  # plain data: no torch
    from sdfast.export.families import FAMILIES

    parser.add_argument("--model", required=True,
                        help=f"a diffusers-format folder, or a built-in random-weight model: {', '.join(BUILTIN_MODELS)}")
    parser.add_argument("--out", required=True, type=Path, help="the engine dir to write")
    parser.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's native size)")
    parser.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's native size)")
    parser.add_argument("--size", action="append", default=[], metavar="WxH",
                        help="an image size the engine dir serves, width x height (repeatable: 1024x1024, 1152x896, 896x1152, ...). "
                             "Each is a static graph of the U-Net and VAE over one copy of the weights, on disk and in memory. "
                             "The first is the default size, unless --height/--width give it")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--precision", default="fp32", help="weights precision: fp32 (default) or fp16 (U-Net and text encoders; the VAE stays fp32 unless the family's recipe says otherwise, see export/<family>.toml)")
    parser.add_argument("--no-guidance", dest="guidance", action="store_false",
                        help="export the U-Net at batch B instead of 2B: no classifier-free guidance, twice as fast per step")
    parser.add_argument("--max-prompt-chunks", type=int,
                        help="longest prompt the U-Net takes, in 75-token chunks (default 8, i.e. 600 tokens)")
    parser.add_argument("--no-cpu-variant", dest="cpu_variant", action="store_false",
                        help="skip the copy of each graph pre-optimized for onnxruntime's CPU provider (half the disk; CPU cold start then re-optimizes)")
    parser.add_argument("--t5", choices=("none", "fp32", "fp16", "int8"),
                        help="SD3's T5-XXL text encoder (19 GB in fp32): none (default: zeros in its place, as diffusers without "
                             "it), fp32, fp16 (checked on a small T5 only: T5-XXL's feed-forward outputs overflow fp16, which the "
                             "export's parity check would refuse) or int8 (onnxruntime's dynamic quantization of its MatMuls)")
    parser.add_argument("--no-controlnet-inputs", dest="controlnet_inputs", action="store_false",
                        help="export the U-Net without its ControlNet residual inputs (fed zeros when no ControlNet runs); "
                             "such an engine dir cannot take ControlNets (sdfast export-controlnet)")
    parser.add_argument("--step-cache", action="store_true",
                        help="also export DeepCache's shallow U-Net, and the deep feature it reuses as a second U-Net output, so "
                             "generate --step-cache N can skip the deep blocks on N-1 of every N steps (sd15, sdxl)")
    parser.add_argument("--step-cache-depth", type=int, metavar="N",
                        help="layers of the first down block the shallow U-Net runs (default 1; 0 is fastest, the block's "
                             "layer count the most faithful)")
    parser.add_argument("--guidance-truncation", action="store_true",
                        help="also export the U-Net without the unconditional rows (over the same weights, one copy), so "
                             "generate --guidance-stop F can skip the unconditional half after a fraction F of the steps")
    parser.add_argument("--vae-tile", type=int, metavar="PIXELS",
                        help="also export the VAE decoder and encoder at this tile size (a multiple of 64, at most the image's "
                             "side), for generate --vae-tiling: large images decoded and encoded in blended tiles, for memory")
    parser.add_argument("--vae-decoder", dest="tiny_vae", metavar="DIR",
                        help="also export this tiny VAE decoder (an AutoencoderTiny/TAESD folder, or the built-ins taesd, taesdxl, "
                             "taesd3) beside the full one, for generate --vae-decoder tiny")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="fuse this LoRA .safetensors (kohya/A1111 or diffusers/PEFT) into the weights at SCALE (default 1); "
                             "repeatable; recorded in the manifest and the model hash. LoRAs can also be applied at run time "
                             "without re-export (generate --lora, <lora:name:weight>)")
    parser.add_argument("--family", help=f"the model family, overriding what model_index.json's pipeline class implies ({', '.join(FAMILIES)})")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from sdfast.cli.progress import ElapsedLog
    from sdfast.export.build import ExportRequest, check_request, export_engine
    from sdfast.export.lora_fuse import parse_lora_argument

    if args.step_cache_depth is not None and not args.step_cache:
        from sdfast.errors import ConfigError

        raise ConfigError("--step-cache-depth applies with --step-cache")
    sizes = [parse_size(text) for text in args.size]
    height, width = args.height, args.width
    if sizes and height is None and width is None:
        (width, height), sizes = sizes[0], sizes[1:]
    request = ExportRequest(
        model=args.model, out=args.out, height=height, width=width, batch=args.batch, sizes=tuple(sizes),
        precision=args.precision, guidance=args.guidance, force=args.force, family=args.family, max_prompt_chunks=args.max_prompt_chunks, cpu_variant=args.cpu_variant,
        t5=args.t5, controlnet_inputs=args.controlnet_inputs, loras=tuple(parse_lora_argument(text) for text in args.lora),
        step_cache=args.step_cache, step_cache_depth=1 if args.step_cache_depth is None else args.step_cache_depth, tiny_vae=args.tiny_vae,
        guidance_truncation=args.guidance_truncation, vae_tile=args.vae_tile,
    )
    check_request(request)  # refuse bad shapes and paths before importing torch
    export_engine(request, ElapsedLog("export"))
    print(args.out)
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """'1152x896' -> (1152, 896): width x height, as A1111 writes sizes."""
    from sdfast.errors import ConfigError

    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise ConfigError(f"--size '{text}' is not WIDTHxHEIGHT (for example 768x512)")
    for label, value in (("width", int(width)), ("height", int(height))):
        if value <= 0 or value % 8:
            raise ConfigError(f"--size {text}: {label} {value} is not a positive multiple of 8; Stable Diffusion works on 8x8 latent cells")
    return int(width), int(height)
