"""Control images: A1111's weight-free preprocessors (canny through OpenCV, invert, none) and its three resize modes,
giving the [1, 3, H, W] array in [0, 1] a ControlNet takes (diffusers' control image processor: RGB, not normalized).

The resize modes follow sd-webui-controlnet's detectmap_proc: "Just Resize" stretches to the engine's size, "Crop and
Resize" scales to cover it and crops the middle, "Resize and Fill" scales to fit inside and fills the rest with the
median colour of the image's border. Resampling is OpenCV's area filter when shrinking, bicubic when enlarging (its
special cases for one-pixel edges and segmentation maps are not reproduced). An image already at the engine's size
is used as it is, which is what diffusers' pipelines do.
"""
from __future__ import annotations

import numpy as np

from sdfast.errors import RequestError

PREPROCESSORS = ("none", "canny", "invert")  # A1111 module names sdfast runs: none of them needs model weights
# A1111's modules that need an annotator's weights, refused by name (preprocess elsewhere, then send module "none")
NEEDS_WEIGHTS = (
    "depth_midas", "depth_leres", "depth_leres++", "depth_zoe", "depth_anything", "depth_anything_v2", "depth_hand_refiner",
    "normal_bae", "normal_midas", "normal_dsine", "openpose", "openpose_face", "openpose_faceonly", "openpose_full",
    "openpose_hand", "dw_openpose_full", "animal_openpose", "densepose", "densepose_parula", "hed", "hed_safe", "pidinet",
    "pidinet_safe", "pidinet_scribble", "scribble_hed", "scribble_pidinet", "softedge_hed", "softedge_hedsafe",
    "softedge_pidinet", "softedge_pidisafe", "softedge_teed", "softedge_anyline", "mlsd", "lineart_realistic", "lineart_coarse",
    "lineart_anime", "lineart_anime_denoise", "lineart_standard", "seg_ofade20k", "seg_ofcoco", "seg_ufade20k", "seg_anime_face",
    "mediapipe_face", "inpaint_only+lama", "lama", "clip_vision", "revision_clipvision", "revision_ignore_prompt",
    "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_face_id",
    "ip-adapter_face_id_plus", "ip-adapter-auto", "instant_id_face_embedding", "instant_id_face_keypoints", "t2ia_style_clipvision",
    "t2ia_sketch_pidi", "segment",
)
# A1111's weight-free modules sdfast does not run (yet), refused by name too
NOT_RUN = ("shuffle", "tile_resample", "tile_colorfix", "tile_colorfix+sharp", "blur_gaussian", "scribble_xdog", "threshold",
           "binary", "color", "t2ia_color_grid", "recolor_luminance", "recolor_intensity", "reference_only", "reference_adain",
           "reference_adain+attn", "inpaint", "inpaint_only")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # A1111's labels; also taken as 0, 1, 2
_RESIZE_ALIASES = {"resize": 0, "just_resize": 0, "crop": 1, "inner_fit": 1, "crop_and_resize": 1, "fill": 2, "outer_fit": 2,
                   "resize_and_fill": 2}
CANNY_DEFAULTS = (100.0, 200.0)  # A1111's low and high thresholds
DEFAULT_PROCESSOR_RES = 512
MAX_PIXELS = 64 * 2**20  # a control image above 64 megapixels is refused


def module_key(module: str) -> str:
    """A1111's module name as sdfast runs it ('none', 'canny', 'invert'); RequestError naming what sdfast cannot run."""
    name = str(module).strip()
    lowered = name.lower()
    aliases = {"invert (from white bg & black line)": "invert", "": "none"}
    lowered = aliases.get(lowered, lowered)
    if lowered in PREPROCESSORS:
        return lowered
    if lowered in NEEDS_WEIGHTS:
        raise RequestError(f"preprocessor '{name}' needs model weights (an annotator), which sdfast does not ship: preprocess the "
                           f"image elsewhere and send it with module 'none' (sdfast runs {', '.join(PREPROCESSORS)})")
    if lowered in NOT_RUN:
        raise RequestError(f"preprocessor '{name}' is not run by sdfast: preprocess the image elsewhere and send it with module "
                           f"'none' (sdfast runs {', '.join(PREPROCESSORS)})")
    raise RequestError(f"unknown preprocessor '{name}': sdfast runs {', '.join(PREPROCESSORS)}")


def resize_mode_label(value: object) -> str:
    """A1111's resize mode label from its label, a short alias or its index (0, 1, 2); RequestError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(RESIZE_MODES):
        return RESIZE_MODES[value]
    if isinstance(value, str):
        key = value.strip().lower().replace(" ", "_")
        for label in RESIZE_MODES:
            if key == label.lower().replace(" ", "_"):
                return label
        if key in _RESIZE_ALIASES:
            return RESIZE_MODES[_RESIZE_ALIASES[key]]
    raise RequestError(f"resize mode '{value}' is not one of {', '.join(RESIZE_MODES)} (or 0, 1, 2)")


def rgb_pixels(image, label: str = "control image") -> np.ndarray:
    """A PIL image -> [H, W, 3] uint8 RGB (alpha dropped; 16-bit greyscale scaled); RequestError when it is too large."""
    from sdfast.runtime.images import _eight_bit

    width, height = image.size
    if width * height > MAX_PIXELS:
        raise RequestError(f"{label} is {width}x{height}: more than {MAX_PIXELS // 2**20} megapixels")
    return np.asarray(_eight_bit(image).convert("RGB"), dtype=np.uint8)


def pixel_perfect_resolution(pixels: np.ndarray, width: int, height: int, resize_mode: str) -> int:
    """sd-webui-controlnet's pixel-perfect processor resolution: the short side the image has once fitted to the target."""
    raw_height, raw_width = pixels.shape[:2]
    ratios = (height / raw_height, width / raw_width)
    scale = min(ratios) if resize_mode == "Resize and Fill" else max(ratios)
    return int(np.round(scale * min(raw_height, raw_width)))


def preprocess(pixels: np.ndarray, module: str, processor_res: int | None = None, threshold_a: float | None = None,
               threshold_b: float | None = None) -> np.ndarray:
    """[H, W, 3] uint8 -> the detected map [h, w, 3] uint8: none (as it is), invert (255 - x), or canny (OpenCV's
    Canny edge detector with low/high thresholds a and b, on the image scaled to a short side of processor_res)."""
    module = module_key(module)
    if module == "none":
        return pixels
    if module == "invert":
        return 255 - pixels
    cv2 = _cv2()
    low, high = (CANNY_DEFAULTS[0] if threshold_a is None or threshold_a < 0 else float(threshold_a),
                 CANNY_DEFAULTS[1] if threshold_b is None or threshold_b < 0 else float(threshold_b))
    if not 0 <= low <= high <= 10000:
        raise RequestError(f"canny thresholds must satisfy 0 <= low (threshold a) <= high (threshold b), not {low} and {high}")
    resolution = DEFAULT_PROCESSOR_RES if processor_res is None or processor_res <= 0 else int(processor_res)
    if resolution > 8192:
        raise RequestError(f"processor resolution {resolution} is above 8192")
    scaled = _scale_short_side(pixels, resolution)
    edges = cv2.Canny(scaled, low, high)  # edges: [h, w] of 0 and 255
    return np.repeat(edges[:, :, None], 3, axis=2)


def fit(pixels: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """[h, w, 3] uint8 -> [height, width, 3] uint8 by A1111's resize mode (see the module's docstring)."""
    raw_height, raw_width = pixels.shape[:2]
    if (raw_height, raw_width) == (height, width):
        return pixels
    if resize_mode == "Just Resize":
        return _resize(pixels, width, height)
    ratios = (height / raw_height, width / raw_width)
    if resize_mode == "Resize and Fill":
        scale = min(ratios)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # border: [2w + 2h, 3]
        canvas = np.tile(np.median(border, axis=0).astype(np.uint8)[None, None], (height, width, 1))
        inner = _resize(pixels, max(1, int(np.round(raw_width * scale))), max(1, int(np.round(raw_height * scale))))
        top, left = max(0, (height - inner.shape[0]) // 2), max(0, (width - inner.shape[1]) // 2)
        canvas[top:top + inner.shape[0], left:left + inner.shape[1]] = inner[:height, :width]
        return canvas
    scale = max(ratios)  # Crop and Resize: the middle region that, scaled, covers the target, cut first (never a huge canvas)
    crop_height, crop_width = min(raw_height, max(1, int(np.round(height / scale)))), min(raw_width, max(1, int(np.round(width / scale))))
    top, left = (raw_height - crop_height) // 2, (raw_width - crop_width) // 2
    return _resize(pixels[top:top + crop_height, left:left + crop_width], width, height)


def control_image(image, module: str, width: int, height: int, resize_mode: object = "Crop and Resize",
                  processor_res: int | None = None, threshold_a: float | None = None, threshold_b: float | None = None,
                  pixel_perfect: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A PIL image -> (the ControlNet's input [1, 3, height, width] float32 in [0, 1], the detected map [h, w, 3] uint8)."""
    pixels = rgb_pixels(image)
    label = resize_mode_label(resize_mode)
    if pixel_perfect:
        processor_res = pixel_perfect_resolution(pixels, width, height, label)
    detected = preprocess(pixels, module, processor_res, threshold_a, threshold_b)
    return control_array(fit(detected, width, height, label)), detected


def control_array(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [1, 3, H, W] float32 in [0, 1] (diffusers' control image processor: no normalization)."""
    return (pixels.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None].copy()


def _scale_short_side(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """The image scaled to a short side of ``resolution``; RequestError when that would exceed MAX_PIXELS."""
    height, width = pixels.shape[:2]
    scale = resolution / min(height, width)
    scaled_width, scaled_height = max(1, int(np.round(width * scale))), max(1, int(np.round(height * scale)))
    if scaled_width * scaled_height > MAX_PIXELS:
        raise RequestError(f"processor resolution {resolution} on a {width}x{height} image makes {scaled_width}x{scaled_height}: "
                           f"more than {MAX_PIXELS // 2**20} megapixels")
    return _resize(pixels, scaled_width, scaled_height)


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's area filter when shrinking, bicubic when enlarging (sd-webui-controlnet's choice)."""
    cv2 = _cv2()
    if (pixels.shape[1], pixels.shape[0]) == (width, height):
        return pixels
    shrinking = width * height < pixels.shape[0] * pixels.shape[1]
    return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise RequestError("control image resizing and canny need OpenCV: pip install opencv-python-headless "
                           "(or sdfast[control])") from None
    return cv2
