"""sdfast generate: prompt -> PNG(s) with an engine dir, on the lean runtime."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dir", type=Path, help="an engine dir written by 'sdfast export'")
    parser.add_argument("prompt", help="the prompt")
    parser.add_argument("--negative", default="", help="the negative prompt")
    parser.add_argument("--steps", type=int, help="sampling steps (default 25; 4 on an engine exported without guidance, "
                                                   "which serves a distilled model: Turbo, Lightning)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale; 1 disables guidance (default: the family's, 7.5 for "
                                                   "SD 1.x and 2.x, 5 for SDXL, 7 for SD3; 1 on an engine exported without guidance)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same image as diffusers (default 0)")
    parser.add_argument("--sampler", help="sampler, by A1111 or diffusers name, e.g. 'Euler a', 'DPM++ 2M Karras' (default euler; "
                                           "on an engine without guidance, its scheduler's; see 'sdfast samplers')")
    parser.add_argument("--height", type=int, help="one of the engine dir's sizes (default: its first; see 'sdfast info')")
    parser.add_argument("--width", type=int, help="one of the engine dir's sizes (default: its first)")
    parser.add_argument("--batch-size", type=int, help="images per U-Net call, 1 to the engine's batch (default: the engine's)")
    parser.add_argument("--n-iter", type=int, default=1, help="batches to run; image k gets seed + k, as A1111 (default 1)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta, 0..1: 0 is deterministic (default 0)")
    parser.add_argument("--clip-skip", type=int, default=1, help="A1111's clip skip: 1 is the last text-encoder layer (default 1)")
    parser.add_argument("--init-image", type=Path, help="img2img: start from this image (resized to the engine's size, with a warning)")
    parser.add_argument("--strength", type=float,
                        help="img2img denoising strength 0..1 (default 0.75; 1.0 on a 9-channel inpainting engine)")
    parser.add_argument("--mask", type=Path, help="inpainting: white repaints, black keeps (needs --init-image)")
    parser.add_argument("--refiner", type=Path, help="SDXL: an engine dir of the refiner, which runs the schedule's last steps")
    parser.add_argument("--refiner-switch", type=float,
                        help="the fraction of the schedule the base runs before the refiner takes over (default 0.8, as A1111)")
    parser.add_argument("--slg-layers", help="SD3.5: skip-layer guidance on these transformer blocks, e.g. 7,8,9 (SD3.5 Medium's "
                                              "recipe); off by default")
    parser.add_argument("--slg-scale", type=float, help="skip-layer guidance scale (default 2.8, diffusers')")
    parser.add_argument("--slg-start", type=float, help="skip-layer guidance starts after this fraction of the steps (default 0.01)")
    parser.add_argument("--slg-stop", type=float, help="and stops before this fraction (default 0.2)")
    parser.add_argument("--step-cache", type=int, metavar="N",
                        help="fast mode (DeepCache): the full U-Net every N steps (from the first), its shallow branch on the cached deep feature "
                             "in between (2 to 10; the engine dir needs export --step-cache; named in the PNG's parameters)")
    parser.add_argument("--guidance-stop", type=float, metavar="F",
                        help="fast mode (guidance truncation): classifier-free guidance up to step int(steps x F), the "
                             "unconditional half skipped after it, as diffusers' dynamic-CFG callback (0 to 1; the engine dir "
                             "needs export --guidance-truncation)")
    parser.add_argument("--int8", action="store_true",
                        help="fast mode: the engine dir's selective int8 U-Net (added by sdfast quantize), CPU backend; with "
                             "--step-cache its int8 shallow U-Net too; named in the PNG's parameters")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode (and encode) in overlapping tiles, the seams blended, for memory on large images (the "
                             "engine dir needs export --vae-tile PIXELS)")
    parser.add_argument("--vae-decoder", choices=("full", "tiny"), default="full",
                        help="tiny: decode with the engine dir's tiny VAE (TAESD, export --vae-decoder), a fast approximate "
                             "decode named in the PNG's parameters (default full)")
    hires = parser.add_argument_group("hires fix (A1111's): a first pass at --width x --height, an upscale, then img2img at the "
                                      "larger size, which the engine dir must have (export --size)")
    hires.add_argument("--hires-scale", type=float, help="upscale by this factor (turns hires fix on; A1111's hr_scale)")
    hires.add_argument("--hires-resize", metavar="WxH", help="upscale to this size instead (0 for a side keeps the aspect ratio; "
                                                            "turns hires fix on; A1111's hr_resize_x/y)")
    hires.add_argument("--hires-upscaler", help="Latent (default), Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
                                                "Latent (nearest), Latent (nearest-exact), Lanczos, Nearest or None")
    hires.add_argument("--hires-steps", type=int, help="second-pass steps (default: as many as the first pass)")
    hires.add_argument("--hires-denoise", type=float, help="second-pass denoising strength, above 0 to 1 (default 0.7)")
    hires.add_argument("--hires-prompt", help="second-pass prompt (default: the prompt)")
    hires.add_argument("--hires-negative", help="second-pass negative prompt (default: the negative prompt)")
    hires.add_argument("--hires-sampler", help="second-pass sampler (default: --sampler)")
    from sdfast.cli import control_args

    control_args.add_arguments(parser)
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT[:UNET_WEIGHT]]",
                        help="apply a LoRA from --lora-dir, by file stem, at WEIGHT (default 1; a second weight is the U-Net's, "
                             "the first then the text encoders'), as <lora:NAME:WEIGHT> in the prompt does; repeatable, weights -10..10")
    parser.add_argument("--lora-dir", type=Path, help="the folder of LoRA .safetensors files (kohya/A1111 or diffusers/PEFT) "
                                                      "that --lora and <lora:...> tags name")
    parser.add_argument("--backend", default="cpu", help="execution backend: cpu, cuda (onnxruntime-gpu) or tensorrt (default cpu); the GPU ones keep the sampler loop on the device")
    parser.add_argument("--verify", default="full", choices=("full", "size"), help="check engine files by sha256 (full) or size only")
    parser.add_argument("-o", "--output", type=Path, default=Path("sdfast.png"),
                        help="output PNG; with N > 1 images (batch x n-iter), NAME-0.png ... NAME-(N-1).png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or timing summary")


def hires_fix(args: argparse.Namespace):
    """The --hires-* options as a HiresFix, or None without --hires-scale/--hires-resize; RequestError for an option
    given without them."""
    from sdfast.errors import RequestError
    from sdfast.runtime.hires import DEFAULT_STRENGTH, HiresFix

    given = [f"--hires-{name.replace('_', '-')}" for name in ("upscaler", "steps", "denoise", "prompt", "negative", "sampler")
             if getattr(args, f"hires_{name}") is not None]
    if args.hires_scale is None and args.hires_resize is None:
        if given:
            raise RequestError(f"{given[0]} needs --hires-scale or --hires-resize (which turn hires fix on)")
        return None
    resize = (0, 0)
    if args.hires_resize is not None:
        width, sep, height = args.hires_resize.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit() or width == height == "0":
            raise RequestError(f"--hires-resize '{args.hires_resize}' is not WIDTHxHEIGHT (0 for a side keeps the aspect ratio)")
        resize = (int(width), int(height))
    return HiresFix(scale=2.0 if args.hires_scale is None else args.hires_scale, resize_width=resize[0], resize_height=resize[1],
                    upscaler=args.hires_upscaler or "Latent", steps=args.hires_steps or 0,
                    denoising_strength=DEFAULT_STRENGTH if args.hires_denoise is None else args.hires_denoise,
                    prompt=args.hires_prompt or "", negative_prompt=args.hires_negative or "", sampler=args.hires_sampler)


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdfast.cli.progress import LoadBars
    from sdfast.errors import RequestError
    from sdfast.runtime.images import check_output_paths, load_init_image, load_mask, save_png
    from sdfast.runtime.pipeline import GenerationRequest, Pipeline
    from sdfast.runtime.request_check import RequestChecker

    if args.mask is not None and args.init_image is None:
        raise RequestError("--mask needs --init-image (the image to inpaint)")
    if args.strength is not None and args.init_image is None:
        raise RequestError("--strength needs --init-image")
    if args.refiner_switch is not None and args.refiner is None:
        raise RequestError("--refiner-switch needs --refiner (the refiner's engine dir)")
    # Everything that can be refused is refused before the engines are hashed and loaded: the manifest and the
    # scheduler config are enough to check the request, and the output location is probed by writing to it.
    checker = RequestChecker.for_engine_dir(args.engine_dir, args.width, args.height)  # at the size asked for
    warnings: list[str] = []
    init_image = load_init_image(args.init_image, checker.width, checker.height, warnings) if args.init_image else None
    mask = load_mask(args.mask, checker.width, checker.height, warnings) if args.mask else None
    refiner_switch = None
    if args.refiner is not None:
        from sdfast.runtime.refiner import check_switch

        refiner_switch = check_switch(0.8 if args.refiner_switch is None else args.refiner_switch)
        RequestChecker.for_engine_dir(args.refiner)  # a bad refiner dir is refused before anything loads
    slg = None
    given = [flag for flag, value in (("--slg-scale", args.slg_scale), ("--slg-start", args.slg_start), ("--slg-stop", args.slg_stop))
             if value is not None]
    if given and args.slg_layers is None:
        raise RequestError(f"{given[0]} needs --slg-layers (the transformer blocks skip-layer guidance skips, e.g. 7,8,9)")
    if args.slg_layers is not None:
        from sdfast.runtime.generation import SkipLayerGuidance

        try:
            layers = tuple(int(layer) for layer in args.slg_layers.split(","))
        except ValueError:
            raise RequestError(f"--slg-layers '{args.slg_layers}' is not a comma-separated list of block indices (e.g. 7,8,9)") from None
        defaults = SkipLayerGuidance()
        slg = SkipLayerGuidance(layers, *(default if value is None else value for value, default in (
            (args.slg_scale, defaults.scale), (args.slg_start, defaults.start), (args.slg_stop, defaults.stop))))
    control = ()
    given = [flag for flag, value in (("--control-module", args.control_module), ("--guess-mode", args.guess_mode),
                                      ("--processor-res", args.processor_res is not None), ("--pixel-perfect", args.pixel_perfect),
                                      ("--control-mode", args.control_mode != "balanced"), ("--control-resize", args.control_resize != "crop"))
             if value]
    if given and not args.control:
        raise RequestError(f"{given[0]} needs --control (the ControlNet and its image)")
    if args.control:
        from sdfast.cli.control_args import control_units

        control = control_units(args, checker.width, checker.height)
    from sdfast.runtime.lora.library import LoraLibrary
    from sdfast.runtime.lora.prompt_tags import extract_loras, parse_use

    library = LoraLibrary(args.lora_dir)
    loras = tuple(parse_use(text, "--lora") for text in args.lora)
    for use in [*extract_loras(args.prompt)[1], *loras]:  # names are checked before the engines load
        library.path(use.name)
    hires = hires_fix(args)
    cfg = args.cfg if args.cfg is not None else checker.default_cfg_scale
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, cfg_scale=cfg, seed=args.seed,
        steps=args.steps if args.steps is not None else checker.default_steps or 25,
        sampler=args.sampler if args.sampler is not None else checker.default_sampler or "euler",
        height=args.height, width=args.width, batch_size=args.batch_size, n_iter=args.n_iter,
        clip_skip=args.clip_skip, init_image=init_image, mask=mask, strength=args.strength, eta=args.eta, refiner_switch=refiner_switch,
        skip_layer_guidance=slg, control=control, loras=loras, hires=hires, step_cache=args.step_cache,
        vae_decoder=args.vae_decoder, guidance_stop=args.guidance_stop, vae_tiling=args.vae_tiling,
        int8=args.int8,
    )
    prepared = checker.prepare(request)
    paths = output_paths(args.output, prepared.batch * args.n_iter)
    check_output_paths(paths)

    if args.backend == "tensorrt" and not args.quiet:
        from sdfast.cli.progress import ElapsedLog
        from sdfast.runtime.backends import get_backend

        get_backend("tensorrt").progress = ElapsedLog("tensorrt")  # the first load on a GPU model builds its engines
    load_bars = None if args.quiet else LoadBars()
    try:
        pipeline = Pipeline.load(args.engine_dir, backend=args.backend, verify=args.verify, progress=load_bars)
        if args.refiner is not None:
            pipeline.attach_refiner(Pipeline.load(args.refiner, backend=args.backend, verify=args.verify, progress=load_bars))
    finally:
        if load_bars is not None:
            load_bars.close()
    pipeline.loras.library = library
    pipeline = pipeline.at_size(checker.width, checker.height)  # the graphs of the request's size (the engine dir may have several)

    bar = None if args.quiet else tqdm(desc="sampling", unit="step", file=sys.stderr, leave=False)
    if bar is not None:  # a LoRA switch (merge and sessions) comes before the first step: seconds, on SDXL a minute
        pipeline.loras.progress = lambda message: bar.write(f"sdfast generate: {message}", file=sys.stderr)

    def on_step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    started = time.perf_counter()
    text_encoder_ms, unet_steps, vae_decode_ms, written = 0.0, [], [], 0
    try:
        for result in pipeline.generate_batches(request, on_step=on_step if bar is not None else None):
            for warning in warnings + result.warnings:
                (bar.write if bar is not None else print)(f"sdfast generate: warning: {warning}", file=sys.stderr)
            warnings = []
            for pixels, parameters in zip(result.images, result.parameters):  # each batch is saved as soon as it is done
                save_png(pixels, paths[written], parameters)
                (bar.write if bar is not None else print)(str(paths[written]), file=sys.stdout)
                written += 1
            text_encoder_ms += result.timings.text_encoder * 1e3
            unet_steps += result.timings.unet_steps
            vae_decode_ms.append(result.timings.vae_decode * 1e3)
    finally:
        if bar is not None:
            bar.close()  # leave=False: an error below starts on a clean line
    if not args.quiet:
        steps = sorted(unet_steps)
        load = pipeline.load_timings
        denoiser = pipeline.manifest.denoiser_label
        print(
            f"timing ({pipeline.backend}, {pipeline.width}x{pipeline.height}, {denoiser} batch {pipeline.manifest.geometry['unet_batch']}): "
            f"load {load['total_s']:.2f} s (verify {load['verify_s']:.2f} s, engines {load['engines_s']:.2f} s"
            f"{f', ControlNets {pipeline.controlnets.load_s:.2f} s' if pipeline.controlnets.load_s else ''}"
            f"{f', LoRA merge {pipeline.loras.switch_s:.2f} s' if pipeline.loras.switch_s else ''}) | "
            f"text encoder {text_encoder_ms:.0f} ms | {denoiser} step median {steps[len(steps) // 2] * 1e3:.0f} ms "
            f"(min {steps[0] * 1e3:.0f}, max {steps[-1] * 1e3:.0f}) x {len(steps)} | "
            f"VAE decode {sorted(vae_decode_ms)[len(vae_decode_ms) // 2]:.0f} ms per batch | generate {time.perf_counter() - started:.2f} s",
            file=sys.stderr,
        )
    return 0
