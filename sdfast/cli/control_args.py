"""generate's ControlNet options: --control NAME:IMAGE[:WEIGHT[:START:END]] (repeatable) and the per-unit preprocessing."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", action="append", default=[], metavar="NAME:IMAGE[:WEIGHT[:START:END]]",
                        help="apply the engine dir's ControlNet NAME (sdfast export-controlnet --name) with this control image, "
                             "weight (default 1, 0 to 2) and guidance start and end as fractions of the steps (default 0 and 1); "
                             "repeat it for several ControlNets, their residuals summed")
    parser.add_argument("--control-module", action="append", default=[], metavar="MODULE[:LOW:HIGH]",
                        help="the preprocessor of the --control in the same position: none (default: the image is the control map, "
                             "such as a depth map or a pose), invert, or canny with OpenCV's low and high thresholds (default 100:200)")
    parser.add_argument("--control-mode", default="balanced", choices=("balanced", "prompt", "control"),
                        help="A1111's control mode for every unit: balanced, prompt ('My prompt is more important') or control "
                             "('ControlNet is more important') (default balanced)")
    parser.add_argument("--guess-mode", action="store_true", help="diffusers' guess mode: the ControlNets see no prompt (the "
                                                                  "unconditional rows get no control; scales rise from 0.1 to 1)")
    parser.add_argument("--control-resize", default="crop", choices=("resize", "crop", "fill"),
                        help="fit a control image of another size: resize (A1111's Just Resize), crop (Crop and Resize, default) "
                             "or fill (Resize and Fill)")
    parser.add_argument("--processor-res", type=int, help="the short side canny detects edges at (default 512)")
    parser.add_argument("--pixel-perfect", action="store_true", help="canny at the resolution the image has once fitted (A1111's "
                                                                     "pixel perfect), instead of --processor-res")


def parse_control(spec: str) -> tuple[str, Path, float, float, float]:
    """'NAME:IMAGE[:WEIGHT[:START:END]]' -> (name, image path, weight, start, end); RequestError when malformed."""
    from sdfast.errors import RequestError

    parts = spec.split(":")
    name, rest = parts[0], parts[1:]
    numbers: list[float] = []
    for count in (3, 1):  # the numbers come last; a path may itself hold ':'
        if len(rest) > count:
            try:
                numbers = [float(value) for value in rest[-count:]]
                rest = rest[:-count]
                break
            except ValueError:
                continue
    if not name or not rest or not ":".join(rest):
        raise RequestError(f"--control '{spec}' is not NAME:IMAGE[:WEIGHT[:START:END]] (for example canny:edges.png:0.8:0:1)")
    weight, start, end = (numbers + [0.0, 1.0]) if len(numbers) == 1 else (numbers or [1.0, 0.0, 1.0])
    return name, Path(":".join(rest)), weight, start, end


def control_units(args: argparse.Namespace, width: int, height: int) -> tuple:
    """The ControlUnits the options describe, each image loaded, preprocessed and fitted to the engine's size."""
    from sdfast.errors import RequestError
    from sdfast.runtime.control import ControlUnit
    from sdfast.runtime.control_images import control_image, module_key, resize_mode_label
    from sdfast.runtime.images import _open_image

    if len(args.control_module) > len(args.control):
        raise RequestError(f"{len(args.control_module)} --control-module for {len(args.control)} --control: one each, in order")
    resize = resize_mode_label({"resize": 0, "crop": 1, "fill": 2}[args.control_resize])
    units = []
    for index, spec in enumerate(args.control):
        name, path, weight, start, end = parse_control(spec)
        module_spec = args.control_module[index] if index < len(args.control_module) else "none"
        module, *thresholds = module_spec.split(":")
        try:
            low, high = (float(value) for value in thresholds) if thresholds else (None, None)
        except ValueError:
            raise RequestError(f"--control-module '{module_spec}' is not MODULE[:LOW:HIGH] (for example canny:100:200)") from None
        module = module_key(module)
        image, _ = control_image(_open_image(path, "control image"), module, width, height, resize, args.processor_res, low, high,
                                 args.pixel_perfect)
        units.append(ControlUnit(name, image, weight, start, end, args.control_mode, args.guess_mode, module, resize,
                                 args.processor_res if module == "canny" else None, low, high, args.pixel_perfect))
    return tuple(units)
