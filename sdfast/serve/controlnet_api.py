"""sd-webui-controlnet's API over the engine dir's ControlNets: the units of ``alwayson_scripts.controlnet.args`` on
txt2img and img2img, and its /controlnet routes (version, model_list, module_list, detect), as webuiapi sends them."""
from __future__ import annotations

import asyncio
import base64
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from sdfast.errors import RequestError
from sdfast.runtime.control import CONTROL_MODES, MAX_WEIGHT, ControlUnit, control_mode_key
from sdfast.runtime.control_images import (
    CANNY_DEFAULTS,
    DEFAULT_PROCESSOR_RES,
    NEEDS_WEIGHTS,
    PREPROCESSORS,
    control_array,
    fit,
    module_key,
    pixel_perfect_resolution,
    preprocess,
    resize_mode_label,
    rgb_pixels,
)
from sdfast.runtime.images import png_bytes
from sdfast.serve.context import ServeContext
from sdfast.serve.schemas import FieldError, decode_image

API_VERSION = 2  # what sd-webui-controlnet's /controlnet/version answers
MAX_UNITS = 8
# the unit fields sdfast reads
_READ = {"image", "input_image", "mask", "module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
         "guidance_start", "guidance_end", "control_mode", "guessmode", "pixel_perfect", "enabled"}
# fields that change nothing here (memory placement, the UI, saving, the hires pass sdfast does not run): accepted as they come
_IGNORED = {"low_vram", "hr_option", "is_ui", "save_detected_map", "output_dir", "loopback", "use_preview_as_input", "generated_image",
            "batch_images", "batch_image_dir", "batch_mask_dir", "batch_input_gallery", "batch_mask_gallery", "batch_image_files",
            "batch_keyframe_idx", "animatediff_batch", "batch_modifiers"}
# fields that change A1111's image, accepted only at these off values (anything else is refused, never ignored)
_OFF = {"advanced_weighting": (None, []), "effective_region_mask": (None, ""), "union_control_type": ("Unknown", None, ""),
        "ipadapter_input": (None, []), "inpaint_crop_input_image": (False, None), "mask_image": (None, ""), "input_mode": ("simple", None),
        "pulid_mode": ("Fidelity", None)}


def controlnet_router(ctx: ServeContext) -> APIRouter:
    router = APIRouter()

    @router.get("/controlnet/version")
    async def version():
        return {"version": API_VERSION}

    @router.get("/controlnet/model_list")
    async def model_list(update: bool = True):
        """The current model's ControlNets (a request for another model uses that model's own)."""
        _, pipeline = await ctx.model(None, "sd_model_checkpoint")
        return {"model_list": model_titles(pipeline)}

    @router.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False):
        detail = {name: {"model_free": name == "none", "sliders": _sliders(name)} for name in PREPROCESSORS}
        return {"module_list": list(PREPROCESSORS), "module_detail": detail}

    @router.post("/controlnet/detect")
    async def detect(request: Request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise FieldError("body", "is not valid JSON", status=400) from None
        if not isinstance(body, dict):
            raise FieldError("body", "must be a JSON object")
        return await asyncio.to_thread(_detect, body)

    return router


def model_titles(pipeline) -> list[str]:
    """The engine dir's ControlNets as A1111 lists models: 'name [hash]'."""
    return [f"{name} [{pipeline.controlnets.model_hash(name)}]" for name in pipeline.controlnets.names]


def _sliders(module: str) -> list[dict]:
    if module != "canny":
        return []
    return [{"name": "Preprocessor Resolution", "value": DEFAULT_PROCESSOR_RES, "min": 64, "max": 2048},
            {"name": "Canny Low Threshold", "value": CANNY_DEFAULTS[0], "min": 1, "max": 255},
            {"name": "Canny High Threshold", "value": CANNY_DEFAULTS[1], "min": 1, "max": 255}]


def _detect(body: dict) -> dict:
    """The detected maps of the posted images (webuiapi sends them as controlnet_images, A1111 as controlnet_input_images)."""
    module = body.get("controlnet_module", "none")
    try:
        module = module_key(module)
    except RequestError as error:
        raise FieldError("controlnet_module", str(error)) from None
    field = "controlnet_input_images" if "controlnet_input_images" in body else "controlnet_images"
    images = body.get(field) or []
    if not isinstance(images, list) or not images:
        raise FieldError(field, "needs at least one base64 image")
    if len(images) > MAX_UNITS:
        raise FieldError(field, f"at most {MAX_UNITS} images per call")
    resolution = _number(body, "controlnet_processor_res", -1, "controlnet_processor_res", integer=True)
    low, high = (_number(body, key, -1, key) for key in ("controlnet_threshold_a", "controlnet_threshold_b"))
    encoded = []
    for index, text in enumerate(images):
        pixels = rgb_pixels_or_field(decode_image(f"{field}[{index}]", text), f"{field}[{index}]")
        try:
            detected = preprocess(pixels, module, resolution, low, high)
        except RequestError as error:
            raise FieldError("controlnet_processor_res" if "resolution" in str(error) else "controlnet_threshold_a", str(error)) from None
        encoded.append(base64.b64encode(png_bytes(detected, "")).decode())
    return {"images": encoded, "info": "Success"}


def rgb_pixels_or_field(image, field: str) -> np.ndarray:
    try:
        return rgb_pixels(image)
    except RequestError as error:
        raise FieldError(field, str(error), status=413) from None


def _number(unit: dict, key: str, default: float, field: str, integer: bool = False):
    value = unit.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (integer and value != int(value)):
        raise FieldError(field, f"must be a {'whole ' if integer else ''}number, not {value!r}")
    return int(value) if integer else float(value)


def control_units(body, pipeline, init_image=None) -> tuple[ControlUnit, ...]:
    """The request's enabled ControlNet units, each image decoded, preprocessed and fitted to the engine's size; a
    FieldError naming ``alwayson_scripts.controlnet.args[i].<field>`` for anything the engine cannot serve."""
    scripts = {str(name).lower(): value for name, value in body.alwayson_scripts.items()}
    if "controlnet" not in scripts:
        return ()
    prefix = "alwayson_scripts.controlnet"
    script = scripts["controlnet"]
    if not isinstance(script, dict) or not isinstance(script.get("args", []), list):
        raise FieldError(prefix, "must be {\"args\": [unit, ...]}")
    args = script.get("args", [])
    if len(args) > MAX_UNITS:
        raise FieldError(f"{prefix}.args", f"at most {MAX_UNITS} ControlNet units, not {len(args)}")
    units = []
    for index, unit in enumerate(args):
        field = f"{prefix}.args[{index}]"
        if not isinstance(unit, dict):
            raise FieldError(field, "must be a ControlNet unit (a JSON object)")
        if unit.get("enabled", True) is False:
            continue
        units.append(_unit(unit, field, pipeline, init_image))
    return tuple(units)


def _unit(unit: dict[str, Any], field: str, pipeline, init_image) -> ControlUnit:
    for key, value in unit.items():
        if key in _OFF and value not in _OFF[key]:
            raise FieldError(f"{field}.{key}", f"{value!r} is not supported by sdfast (the image would come out without it); "
                                               f"leave it at {_OFF[key][0]!r}")
        if key not in _READ | _IGNORED | set(_OFF):
            raise FieldError(f"{field}.{key}", "is not a ControlNet unit field sdfast knows; leave it out rather than have it ignored")
    model = _model(unit.get("model"), f"{field}.model", pipeline)
    try:
        module = module_key(unit.get("module") or "none")
    except RequestError as error:
        raise FieldError(f"{field}.module", str(error)) from None
    try:
        resize = resize_mode_label(unit.get("resize_mode", "Crop and Resize"))
    except RequestError as error:
        raise FieldError(f"{field}.resize_mode", str(error)) from None
    guess = unit.get("guessmode")  # sd-webui-controlnet's old name: True was "ControlNet is more important"
    mode_value = unit.get("control_mode", 2 if guess is True else (guess or 0))
    try:
        control_mode = control_mode_key(mode_value if mode_value is not None else 0)
    except RequestError as error:
        raise FieldError(f"{field}.control_mode", str(error)) from None
    weight = _number(unit, "weight", 1.0, f"{field}.weight")
    if not 0.0 <= weight <= MAX_WEIGHT:
        raise FieldError(f"{field}.weight", f"must be from 0 to {MAX_WEIGHT:g}, not {weight}")
    start, end = _number(unit, "guidance_start", 0.0, f"{field}.guidance_start"), _number(unit, "guidance_end", 1.0, f"{field}.guidance_end")
    for name, value in (("guidance_start", start), ("guidance_end", end)):
        if not 0.0 <= value <= 1.0:
            raise FieldError(f"{field}.{name}", f"must be from 0 to 1, not {value}")
    if start > end:
        raise FieldError(f"{field}.guidance_start", f"{start} is after guidance_end {end}")
    resolution = _number(unit, "processor_res", -1, f"{field}.processor_res", integer=True)
    low, high = _number(unit, "threshold_a", -1, f"{field}.threshold_a"), _number(unit, "threshold_b", -1, f"{field}.threshold_b")
    if unit.get("mask") not in (None, "") or (isinstance(unit.get("image"), dict) and unit["image"].get("mask")):
        raise FieldError(f"{field}.mask", "ControlNet masks (effective regions, inpaint units) are not supported by sdfast; send none")
    pixels = _image(unit, field, init_image)
    pixel_perfect = unit.get("pixel_perfect", False)
    if not isinstance(pixel_perfect, bool):
        raise FieldError(f"{field}.pixel_perfect", f"must be true or false, not {pixel_perfect!r}")
    if pixel_perfect and module != "none":
        resolution = pixel_perfect_resolution(pixels, pipeline.width, pipeline.height, resize)
    try:
        detected = preprocess(pixels, module, resolution if module == "canny" else None, low, high)
    except RequestError as error:
        raise FieldError(f"{field}.processor_res" if "resolution" in str(error) else f"{field}.threshold_a", str(error)) from None
    canny = module == "canny"
    return ControlUnit(model, control_array(fit(detected, pipeline.width, pipeline.height, resize)), weight, start, end, control_mode,
                       False, module, resize, (resolution if resolution > 0 else DEFAULT_PROCESSOR_RES) if canny else None,
                       (low if low >= 0 else CANNY_DEFAULTS[0]) if canny else None,
                       (high if high >= 0 else CANNY_DEFAULTS[1]) if canny else None, pixel_perfect, a1111_window=True)


def _model(value, field: str, pipeline) -> str:
    """The ControlNet's name from A1111's 'name [hash]', 'name' or the hash alone."""
    names = pipeline.controlnets.names
    if not isinstance(value, str) or value in ("", "None"):
        raise FieldError(field, f"name the ControlNet to run ({', '.join(model_titles(pipeline)) or 'this engine dir has none'})")
    text = value.strip()
    base, _, rest = text.partition(" [")
    for name in names:
        short = pipeline.controlnets.model_hash(name)
        if text in (name, short, f"{name} [{short}]") or (base == name and rest.rstrip("]") in ("", short)):
            return name
    have = ", ".join(model_titles(pipeline)) if names else "none (add one with sdfast export-controlnet)"
    raise FieldError(field, f"unknown ControlNet '{value}': this engine dir has {have}")


def _image(unit: dict, field: str, init_image) -> np.ndarray:
    """The unit's control image: 'image' (a base64 string, or {'image': ...}) or 'input_image'; img2img's init image
    when it has none, as sd-webui-controlnet does."""
    for key in ("image", "input_image"):
        value = unit.get(key)
        if isinstance(value, dict):
            value = value.get("image")
        if value not in (None, ""):
            return rgb_pixels_or_field(decode_image(f"{field}.{key}", value), f"{field}.{key}")
    if init_image is not None:  # a callable: the init image is decoded again only when a unit needs it
        return rgb_pixels_or_field(init_image(), f"{field}.image")
    raise FieldError(f"{field}.image", "a ControlNet unit needs a control image (base64), or an img2img init image to use")


__all__ = ["CONTROL_MODES", "NEEDS_WEIGHTS", "control_units", "controlnet_router", "model_titles"]
