"""What every runtime family module provides: its components, its conditioning and its latent layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from sdfast.errors import EngineError

if TYPE_CHECKING:
    from sdfast.runtime.backends import Engine
    from sdfast.runtime.manifest import Manifest
    from sdfast.runtime.text_encoding import PromptEncoder


@dataclass(frozen=True)
class LatentLayout:
    """The VAE's latent space: latents = (vae_mean - shift) * scaling (diffusers' scaling_factor, shift_factor)."""

    channels: int
    factor: int  # image pixels per latent cell, each way
    scaling_factor: float
    shift_factor: float = 0.0

    def to_vae(self, latents: np.ndarray) -> np.ndarray:
        """Denoiser latents [B, C, h, w] -> the VAE decoder's input."""
        scaled = latents / np.float32(self.scaling_factor)
        return scaled + np.float32(self.shift_factor) if self.shift_factor else scaled

    def from_vae(self, moment: np.ndarray, centred: bool = True) -> np.ndarray:
        """A VAE posterior moment [B, C, h, w] -> denoiser latents; ``centred`` False for the std (no shift)."""
        shifted = moment - np.float32(self.shift_factor) if centred and self.shift_factor else moment
        return shifted * np.float32(self.scaling_factor)


def guided_rows(cond: np.ndarray, uncond: np.ndarray | None, rows: int, guidance: bool) -> np.ndarray:
    """One conditioning array for the denoiser's batch: [2 x rows, ...] unconditional rows first (as diffusers), or
    [rows, ...] without guidance; a guided engine run at cfg <= 1 gets the conditional rows in both halves."""
    if guidance:
        return np.stack([uncond if uncond is not None else cond] * rows + [cond] * rows)
    return np.stack([cond] * rows)


class Family:
    """A family's runtime side. Subclasses set the class attributes and implement ``conditioning``."""

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]]  # components an engine dir of this family must have
    optional: ClassVar[tuple[str, ...]] = ()  # components it may have (the VAE encoder: img2img and inpainting)
    # the inputs the pipeline feeds each component by name, beyond the denoiser's own sample and timestep
    fed_inputs: ClassVar[dict[str, tuple[str, ...]]]
    default_cfg_scale: ClassVar[float] = 7.5  # a request's guidance scale when it names none (diffusers' pipeline default)
    preview_rgb: ClassVar[tuple[tuple[float, float, float], ...]]  # live previews: latent channel -> RGB (runtime.previews)

    def __init__(self, manifest: "Manifest", engines: dict[str, "Engine"]):
        self.manifest, self.engines = manifest, engines
        for component, names in self.fed_inputs.items():
            if component in engines:
                for input_name in names:
                    engines[component].info.input(input_name)  # an EngineError naming the input a re-export would add

    @staticmethod
    def img2img_start_step(steps: int, strength: float) -> int:
        """The first step img2img runs: diffusers' StableDiffusion(XL)Img2ImgPipeline.get_timesteps runs the last
        int(steps x strength) steps."""
        return steps - min(int(steps * strength), steps)

    @classmethod
    def check_components(cls, manifest: "Manifest") -> list[str]:
        """The components to load, required first; an EngineError when a required one is missing."""
        missing = [name for name in cls.required if name not in manifest.components]
        if missing:
            raise EngineError(f"engine dir {manifest.root} has no {', '.join(missing)}")
        return [*cls.required, *(name for name in cls.optional if name in manifest.components)]

    def prompt_encoder(self, component: str, label: str) -> "PromptEncoder":
        """The tokenizer the manifest keys by ``component`` with that text-encoder engine (A1111's chunking and emphasis)."""
        from sdfast.runtime.text_encoding import PromptEncoder
        from sdfast.runtime.tokenizer import PromptTokenizer

        tok = self.manifest.tokenizers.get(component)
        if tok is None:
            raise EngineError(f"engine dir {self.manifest.root}: the manifest has no tokenizer for {component} (re-export the model)")
        tokenizer = PromptTokenizer(self.manifest.path(tok["file"]), tok["bos_id"], tok["eos_id"], tok["pad_id"], tok["max_length"])
        return PromptEncoder(tokenizer, self.engines[component], int(self.manifest.geometry["max_text_chunks"]), label)

    @property
    def latent(self) -> LatentLayout:
        block = self.manifest.latent
        return LatentLayout(int(block["channels"]), int(block["factor"]), float(block["scaling_factor"]), float(block["shift_factor"]))

    def skip_layer_feeds(self, conditioning: dict[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The denoiser's conditioning for skip-layer guidance's call: the prompt's rows in every row, ``layers`` skipped.
        Only families whose denoiser takes a layer mask (SD3) have it."""
        from sdfast.errors import RequestError

        raise RequestError(f"skip-layer guidance applies to SD3 engines only, not to this {self.name} engine")

    def conditioning(self, prompt: str, negative_prompt: str, clip_skip: int, use_cfg: bool,
                     warnings: list[str]) -> dict[str, np.ndarray]:
        """The denoiser's named conditioning arrays for one request, each [unet_batch, ...], unconditional rows first."""
        raise NotImplementedError
