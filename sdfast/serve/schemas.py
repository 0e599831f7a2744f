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

from sdfast.runtime.request_check import MAX_STEPS  # one step limit for the CLI, the Python API and HTTP

MAX_PROMPT_CHARS = 10_000
MAX_IMAGES = 16  # per request: batch_size x n_iter, or n
MAX_IMAGE_BYTES = 16 << 20  # one encoded init image or mask
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_BODY_BYTES = 48 << 20
SEED_LIMIT = 2**32  # A1111 seeds are below 2^32; -1 picks one
DEFAULT_CFG_SCALE = 7.0  # A1111's, on engines exported with guidance
A1111_STEPS = 20  # A1111's default steps, on engines exported with guidance
DEFAULT_REFINER_SWITCH = 0.8  # A1111's refiner_switch_at


# A1111 request fields that change the image, with the values at which they change nothing: any other is refused, never
# ignored. Fields that only act through one of these (script_args with script_name) need no entry.
OFF_VALUES: dict[str, tuple] = {
    "firstphase_width": (0,), "firstphase_height": (0,), "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "restore_faces": (False,), "tiling": (False,), "subseed_strength": (0.0,), "script_name": (None, ""),
    "s_churn": (0.0,), "s_tmin": (0.0,), "s_tmax": (0.0,), "s_noise": (1.0,),
    "resize_mode": (0,), "initial_noise_multiplier": (1.0,),
}
# A1111 options (override_settings, POST /sdapi/v1/options) that change the image, with the values that are what sdfast does.
IMAGE_OPTIONS: dict[str, tuple] = {
    "sd_vae": ("Automatic", "None"),  # the engine's own VAE
    "eta_noise_seed_delta": (0,), "eta_ancestral": (1.0,), "eta_ddim": (0.0,),
    "s_churn": (0.0,), "s_tmin": (0.0,), "s_tmax": (0.0,), "s_noise": (1.0,),
}


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
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)  # None: A1111's 20, or the engine's few steps without guidance
    cfg_scale: float | None = Field(None, ge=0.0, le=30.0)  # None: the engine's (7, or 1 without guidance)
    width: int | None = Field(None, ge=8, le=4096)  # None: the engine dir's default size
    height: int | None = Field(None, ge=8, le=4096)
    seed: int = Field(-1, ge=-1, lt=SEED_LIMIT)
    sampler_name: str | None = Field(None, max_length=64)
    sampler_index: str | None = Field(None, max_length=64)  # deprecated in A1111; used when sampler_name is absent
    scheduler: str | None = Field(None, max_length=32)
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    eta: float | None = Field(None, ge=0.0, le=1.0)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # asked-for features sdfast does not have: accepted only at their off values (OFF_VALUES)
    restore_faces: bool = False
    tiling: bool = False
    subseed_strength: float = 0.0
    script_name: str | None = None
    refiner_checkpoint: str | None = None  # served when 'sdfast serve --refiner' loaded that engine dir
    refiner_switch_at: float | None = Field(None, gt=0.0, lt=1.0)  # None: A1111's 0.8
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0  # A1111: 0 is infinity
    s_noise: float = 1.0
    seed_resize_from_w: int = -1  # checked against the engine's size by the route
    seed_resize_from_h: int = -1
    styles: list[str] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)  # A1111 extensions: ControlNet's units run (controlnet_api.py)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (Stable Diffusion works on 8x8 latent cells), not {value}")
        return value

    def unsupported(self) -> FieldError | None:
        for name, off in OFF_VALUES.items():
            if name in type(self).model_fields and getattr(self, name) not in off:
                return FieldError(name, f"{name} {getattr(self, name)!r} is not supported by sdfast (the image would come out without it); "
                                        f"leave it at {off[0]!r}")
        others = [name for name in self.alwayson_scripts if str(name).lower() != "controlnet"]
        if others:
            return FieldError("alwayson_scripts", f"sdfast runs no A1111 extension but ControlNet ({', '.join(map(str, others))}); "
                                                  "leave the others out (the image would come out without them)")
        if self.styles:
            return FieldError("styles", "styles are not supported by sdfast; put the text in the prompt")
        if self.batch_size * self.n_iter > MAX_IMAGES:
            images = self.batch_size * self.n_iter
            return FieldError("batch_size", f"batch_size x n_iter is {images}; at most {MAX_IMAGES} images per request")
        return None


class Txt2ImgRequest(_Request):
    # hires fix (runtime.hires): the first pass at width x height, img2img at the larger size the engine dir has
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=8.0)
    hr_upscaler: str = Field("Latent", max_length=64)
    hr_second_pass_steps: int = Field(0, ge=0, le=MAX_STEPS)
    hr_resize_x: int = Field(0, ge=0, le=4096)
    hr_resize_y: int = Field(0, ge=0, le=4096)
    hr_sampler_name: str | None = Field(None, max_length=64)
    hr_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)  # the second pass's (A1111's API default); HiresFix checks > 0
    firstphase_width: int = 0  # A1111's old hires fix: refused unless 0
    firstphase_height: int = 0
    hr_checkpoint_name: str | None = None  # another checkpoint for the second pass: refused (one engine dir)

    def hires(self):
        """The hires-fix settings, or None without enable_hr."""
        from sdfast.runtime.hires import HiresFix

        if not self.enable_hr:
            return None
        same = self.hr_sampler_name in (None, "", "Use same sampler")  # A1111's UI sends the latter
        return HiresFix(scale=self.hr_scale, resize_width=self.hr_resize_x, resize_height=self.hr_resize_y, upscaler=self.hr_upscaler,
                        steps=self.hr_second_pass_steps, denoising_strength=self.denoising_strength, prompt=self.hr_prompt,
                        negative_prompt=self.hr_negative_prompt, sampler=None if same else self.hr_sampler_name)


class Img2ImgRequest(_Request):
    init_images: list[str] = Field(default_factory=list, max_length=1)
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    resize_mode: int = 0  # 0: just resize, what sdfast does; crop, fill and latent upscale are refused
    initial_noise_multiplier: float = 1.0


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
