"""ControlNet at run time: the request's units, their per-step scales, and the residuals they add to the U-Net.

A ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models") returns one residual
per U-Net skip connection and one for the mid block. Each unit's residuals are scaled and summed in numpy:
- its weight, while the step lies in [guidance_start, guidance_end] of the steps (diffusers' controlnet_keep; a
  step's every model evaluation counts as that step, Heun's and DPM2's second ones too);
- guess mode (diffusers): scales logspace(-1, 0) from the first residual to the mid block, unconditional rows get none;
- A1111's control modes (sd-webui-controlnet's hook.py): "My prompt is more important" scales residual i by
  0.825 ** (12 - i) ("soft injection"); "ControlNet is more important" does that too and leaves the unconditional rows
  without control ("cfg injection").
The ControlNet engines run with the U-Net's batch; rows a unit does not control get zeros.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from sdfast.errors import RequestError

RESIDUAL_PREFIX, MID_RESIDUAL = "down_block_residual_", "mid_block_residual"
# A1111's control modes: the API's strings, and the index webuiapi's ControlNetUnit(control_mode=...) takes
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important", "control": "ControlNet is more important"}
MAX_WEIGHT = 2.0  # A1111's weight slider runs from 0 to 2
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_residual(name: str) -> bool:
    """Whether a U-Net input is a ControlNet residual (down_block_residual_i, mid_block_residual)."""
    return name.startswith(RESIDUAL_PREFIX) or name == MID_RESIDUAL


def control_mode_key(value: object) -> str:
    """'balanced', 'prompt' or 'control' from a key, A1111's label or its index (0, 1, 2); RequestError otherwise."""
    labels = {label.lower(): key for key, label in CONTROL_MODES.items()}
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTROL_MODES):
        return list(CONTROL_MODES)[value]
    if isinstance(value, str) and (value.lower() in CONTROL_MODES or value.lower() in labels):
        return value.lower() if value.lower() in CONTROL_MODES else labels[value.lower()]
    raise RequestError(f"control mode '{value}' is not one of {', '.join(CONTROL_MODES.values())} (or 0, 1, 2)")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet applied to a request: which, with what image, how strongly and when."""

    model: str  # the ControlNet's name in the engine dir (sdfast export-controlnet --name)
    image: np.ndarray  # [1, 3, H, W] float32 in [0, 1] at the engine's size: the control image, preprocessed and resized
    weight: float = 1.0
    guidance_start: float = 0.0  # fractions of the steps the request runs
    guidance_end: float = 1.0
    control_mode: str = "balanced"  # a key of CONTROL_MODES
    guess_mode: bool = False  # diffusers' guess mode
    module: str = "none"  # the preprocessor that made ``image`` (for the infotext)
    resize_mode: str = "Crop and Resize"  # how ``image`` was fitted to the engine's size (for the infotext)
    processor_res: int | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    a1111_window: bool = False  # the window as sd-webui-controlnet tests it (the A1111 API's units), not diffusers'

    def check(self, height: int, width: int) -> None:
        """RequestError for a unit no ControlNet can run: bad weight, window, mode or image."""
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or not 0.0 <= self.weight <= MAX_WEIGHT:
            raise RequestError(f"ControlNet '{self.model}': weight must be from 0 to {MAX_WEIGHT:g}, not {self.weight}")
        for label, value in (("guidance start", self.guidance_start), ("guidance end", self.guidance_end)):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise RequestError(f"ControlNet '{self.model}': {label} must be from 0 to 1, not {value}")
        if self.guidance_start > self.guidance_end:
            raise RequestError(f"ControlNet '{self.model}': guidance start {self.guidance_start} is after its end {self.guidance_end}")
        if self.control_mode not in CONTROL_MODES:
            raise RequestError(f"ControlNet '{self.model}': control mode '{self.control_mode}' is not one of {', '.join(CONTROL_MODES)}")
        if self.guess_mode and self.control_mode != "balanced":
            raise RequestError(f"ControlNet '{self.model}': guess mode and the control mode '{CONTROL_MODES[self.control_mode]}' "
                               "each set the scales; choose one")
        if not isinstance(self.image, np.ndarray) or self.image.shape != (1, 3, height, width) or self.image.dtype != np.float32:
            raise RequestError(f"ControlNet '{self.model}': its image must be a [1, 3, {height}, {width}] float32 array "
                               "(see control_images.control_image)")

    def active(self, step: int, steps: int) -> bool:
        """diffusers' controlnet_keep: off while step / steps < start or (step + 1) / steps > end; sd-webui-controlnet's
        (``a1111_window``): off while step / steps < start or step / steps > end, one step longer at the end."""
        finished = step / steps if self.a1111_window else (step + 1) / steps
        return not (step / steps < self.guidance_start or finished > self.guidance_end)

    def scales(self, count: int) -> np.ndarray:
        """[count] float32: the scale of each residual (the down blocks' in order, the mid block's last)."""
        if self.guess_mode:  # diffusers' ControlNetModel.forward(guess_mode=True)
            return (np.logspace(-1, 0, count, dtype=np.float64) * self.weight).astype(np.float32)
        if self.control_mode != "balanced":  # A1111's soft injection, cut to the model's residuals as it does for SDXL's 10
            soft = [self.weight * 0.825 ** float(12 - i) for i in range(13)]
            return np.asarray((soft + [self.weight] * count)[:count], dtype=np.float32)
        return np.full(count, self.weight, dtype=np.float32)

    def conditional_only(self) -> bool:
        """Whether the unconditional rows go without this unit: guess mode, and A1111's "ControlNet is more important"."""
        return self.guess_mode or self.control_mode == "control"

    def infotext(self, index: int, model_hash: str | None) -> tuple[str, str]:
        """A1111's infotext entry for unit ``index``: ("ControlNet i", "Module: ..., Model: ..., Weight: ..., ...")."""
        model = f"{self.model} [{model_hash}]" if model_hash else self.model
        fields = {
            "Module": self.module, "Model": model, "Weight": float(self.weight), "Resize Mode": self.resize_mode,
            "Processor Res": self.processor_res, "Threshold A": self.threshold_a, "Threshold B": self.threshold_b,
            "Guidance Start": float(self.guidance_start), "Guidance End": float(self.guidance_end),
            "Pixel Perfect": self.pixel_perfect, "Control Mode": CONTROL_MODES[self.control_mode],
            "Guess Mode": True if self.guess_mode else None,
        }
        text = ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
        return f"ControlNet {index}", text  # quoted by the infotext, as A1111 quotes it
