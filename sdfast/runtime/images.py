"""Decoded images to uint8 pixels and PNG files carrying AUTOMATIC1111-style generation parameters."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from sdfast.errors import RequestError
from sdfast.runtime.files import shared_mode


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, rounded as diffusers' VaeImageProcessor does."""
    images = np.clip(images / np.float32(2.0) + np.float32(0.5), 0.0, 1.0)
    return np.round(images.transpose(0, 2, 3, 1) * np.float32(255.0)).astype(np.uint8)


def infotext(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """The 'parameters' text A1111 writes: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def _quote(value: object) -> object:
    """A1111's infotext quoting (generation_parameters_copypaste.quote): a value with a comma, colon or newline as JSON."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(mark in text for mark in ",:\n") else value


def check_output_paths(paths: list[Path]) -> None:
    """Refuse, before any work, outputs that cannot be written: each directory is probed by creating (and removing) a file."""
    probed = set()
    for path in paths:
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise RequestError(f"output '{path}' must end in .png")
        if path.is_dir():
            raise RequestError(f"output '{path}' is a directory")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise RequestError(f"cannot write '{path}': directory '{parent}' does not exist")
        if path.exists() and not os.access(path, os.W_OK):
            raise RequestError(f"cannot write '{path}': permission denied")
        if parent not in probed:
            probed.add(parent)
            try:  # os.access says yes to root everywhere, also on /proc and /sys: only a real file says whether it can be made
                handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
                os.close(handle)
                os.unlink(probe)
            except OSError as error:
                raise RequestError(f"cannot write '{path}': {error.strerror or error}") from None


def png_bytes(pixels: np.ndarray, parameters: str | None) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes with the A1111 'parameters' text chunk, none when None (a live preview);
    deterministic: same pixels, same bytes."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def save_png(pixels: np.ndarray, path: Path, parameters: str) -> None:
    """Write [H, W, 3] uint8 as PNG with a 'parameters' text chunk; atomically, so no half-written file remains.

    The file gets the mode a plain open() would (0666 less the umask), not mkstemp's private 0600.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
        with os.fdopen(handle, "wb") as file:
            Image.fromarray(pixels, mode="RGB").save(file, format="PNG", pnginfo=info)
        os.chmod(temporary, shared_mode())
        os.replace(temporary, path)
    except OSError as error:
        raise RequestError(f"cannot write '{path}': {error.strerror or error}") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def _open_image(path: Path, label: str):
    """The image, upright (EXIF orientation applied, as diffusers' load_image and A1111), in an 8-bit mode."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise RequestError(f"{label} '{path}' does not exist" if not path.exists() else f"{label} '{path}' is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge image is refused, not half-loaded
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(f"{label} '{path}' is not a readable image ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    try:
        image = _eight_bit(image)
    except RequestError as error:
        raise RequestError(f"{label} '{path}': {error}") from None
    return image


def _fit(image, width: int, height: int, label: str, warnings: list[str]):
    """Resize to the engine's size with Lanczos, as diffusers' VaeImageProcessor does, and say so."""
    from PIL import Image

    if image.size == (width, height):
        return image
    warnings.append(f"{label} is {image.size[0]}x{image.size[1]}; resized to the engine's {width}x{height}")
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def load_init_image(path: Path, width: int, height: int, warnings: list[str]) -> np.ndarray:
    """An image file -> [1, 3, H, W] float32 in [-1, 1] at the engine's size (RGB; alpha is dropped)."""
    return init_image_array(_open_image(path, "init image"), width, height, warnings)


def load_mask(path: Path, width: int, height: int, warnings: list[str]) -> np.ndarray:
    """A mask image file (white = repaint, black = keep) -> [1, 1, H, W] float32 of 0 and 1."""
    return mask_array(_open_image(path, "mask"), width, height, warnings)


def _eight_bit(image):
    """16-bit greyscale scaled to 8 bits (Pillow's convert would clip at 255); 32-bit pixels refused."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        raise RequestError(f"the image has 32-bit {'integer' if image.mode == 'I' else 'float'} pixels; save it as 8- or 16-bit")
    return image


def init_image_array(image, width: int, height: int, warnings: list[str]) -> np.ndarray:
    """A PIL image -> [1, 3, H, W] float32 in [-1, 1] at the engine's size (RGB; alpha is dropped)."""
    image = _fit(_eight_bit(image).convert("RGB"), width, height, "init image", warnings)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # pixels: [H, W, 3] in [0, 1]
    return (pixels.transpose(2, 0, 1)[None] * np.float32(2.0) - np.float32(1.0)).astype(np.float32)


def mask_array(image, width: int, height: int, warnings: list[str]) -> np.ndarray:
    """A PIL mask (white = repaint, black = keep) -> [1, 1, H, W] float32 of 0 and 1, as diffusers' mask processor."""
    image = _fit(_eight_bit(image).convert("L"), width, height, "mask", warnings)
    values = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # values: [H, W] in [0, 1]
    mask = (values >= 0.5).astype(np.float32)[None, None]
    if not mask.any():
        warnings.append("the mask is all black: nothing will be repainted")
    return mask


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images of the same shape (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(peak**2 / mse))
