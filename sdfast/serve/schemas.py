"""Request bodies of the two APIs, validated field by field; a bad one is a 4xx naming the field.

The A1111 fields are the ones the ``webuiapi`` client sends (webuiapi.py, txt2img/img2img payloads). Fields that
ask for something sdfast does not do (hires fix, face restoration, tiling, scripts, subseeds) are accepted at
their off values and refused otherwise, rather than silently ignored. Unknown fields are ignored, as A1111 does.
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sdfast.runtime.pipeline import MAX_STEPS  # one step limit for the CLI, the Python API and HTTP

MAX_PROMPT_CHARS = 10_000
MAX_IMAGES = 16  # per request: batch_size x n_iter, or n
MAX_IMAGE_BYTES = 16 << 20  # one encoded init image or mask
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_BODY_BYTES = 48 << 20
SEED_LIMIT = 2**32  # A1111 seeds are below 2^32; -1 picks one
DEFAULT_CFG_SCALE = 7.0  # A1111's, on engines exported with guidance


class FieldError(Exception):
    """A field's value the engine cannot serve: answered 422 with the field's name."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


def _defaults_for_nulls(data):
    """A1111 treats a JSON null as the field's default; so does sdfast."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    _nulls = model_validator(mode="before")(_defaults_for_nulls)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=0.0, le=30.0)  # None: the engine's (7, or 1 without guidance)
    width: int | None = Field(None, ge=8, le=4096)  # None: the engine's size, the only one it serves
    height: int | None = Field(None, ge=8, le=4096)
    seed: int = Field(-1, ge=-1, lt=SEED_LIMIT)
    sampler_name: str | None = Field(None, max_length=64)
    sampler_index: str | None = Field(None, max_length=64)  # deprecated in A1111; used when sampler_name is absent
    scheduler: str | None = Field(None, max_length=32)
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    eta: float | None = Field(None, ge=0.0, le=1.0)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # asked-for features sdfast does not have: accepted only when off
    enable_hr: bool = False
    restore_faces: bool = False
    tiling: bool = False
    subseed_strength: float = 0.0
    script_name: str | None = None
    styles: list[str] = Field(default_factory=list)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (Stable Diffusion works on 8x8 latent cells), not {value}")
        return value

    def unsupported(self) -> FieldError | None:
        for name, off in (("enable_hr", False), ("restore_faces", False), ("tiling", False), ("subseed_strength", 0.0), ("script_name", None)):
            if getattr(self, name) not in (off, None):
                return FieldError(name, f"{name} is not supported by sdfast; leave it at {off}")
        if self.styles:
            return FieldError("styles", "styles are not supported by sdfast; put the text in the prompt")
        if self.batch_size * self.n_iter > MAX_IMAGES:
            return FieldError("batch_size", f"batch_size x n_iter is {self.batch_size * self.n_iter}; at most {MAX_IMAGES} images per request")
        return None

    def clip_skip(self) -> int:
        value = self.override_settings.get("CLIP_stop_at_last_layers", 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FieldError("override_settings.CLIP_stop_at_last_layers", f"must be an integer >= 1, not {value!r}")
        return value


class Txt2ImgRequest(_Request):
    pass


class Img2ImgRequest(_Request):
    init_images: list[str] = Field(default_factory=list, max_length=1)
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    _nulls = model_validator(mode="before")(_defaults_for_nulls)

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=10)  # OpenAI's own limit
    size: str | None = Field(None, max_length=16)
    response_format: str = Field("b64_json", pattern="^(b64_json|url)$")
    model: str | None = Field(None, max_length=128)
    user: str | None = Field(None, max_length=256)


def decode_image(field: str, text: str):
    """A base64 image (raw, or a data: URL as webuiapi sends) -> PIL image; a FieldError naming ``field`` otherwise."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(text, str) or not text:
        raise FieldError(field, "must be a base64-encoded image")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise FieldError(field, "a data URL must be base64-encoded")
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise FieldError(field, f"image is larger than {MAX_IMAGE_BYTES >> 20} MiB", status=413)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"])
            if image.width * image.height > MAX_IMAGE_PIXELS:  # read from the header, before any pixel is decoded
                raise FieldError(field, f"is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels", status=413)
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FieldError(field, "is not a readable image (PNG, JPEG or WebP)") from None
