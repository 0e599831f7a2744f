"""The A1111 infotext of a generated image: the 'parameters' text its PNG carries."""
from __future__ import annotations

from sdfast import __version__
from sdfast.runtime.generation import GenerationRequest, SkipLayerGuidance
from sdfast.runtime.images import infotext
from sdfast.runtime.int8_unet import infotext as int8_infotext
from sdfast.runtime.step_cache import infotext_value as step_cache_infotext


def generation_infotext(pipeline, request: GenerationRequest, sampler_name: str, seed: int, batch: int, position: int,
                        strength: float | None, stopped: str | None = None, hires: dict | None = None) -> str:
    """A1111's infotext of one image: the prompts, then its settings in A1111's order and wording. ``hires``: hires fix's
    entries (the image is the second pass's; Steps, Sampler and Size stay the first pass's, as A1111 writes them)."""
    return infotext(
        request.prompt + "".join(use.tag() for use in request.loras),  # A1111 reads LoRAs back from the prompt's tags
        request.negative_prompt,
        {
            "Steps": request.steps,
            "Sampler": sampler_name,
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{pipeline.width}x{pipeline.height}",
            "Model hash": pipeline.manifest.model_hash,
            "Model": pipeline.manifest.model_name,
            "Denoising strength": strength,
            "Eta DDIM": request.eta if request.eta else None,
            "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
            "Batch size": batch if batch > 1 else None,
            "Batch pos": position if batch > 1 else None,
            "Refiner": f"{pipeline.refiner.manifest.model_name} [{pipeline.refiner.manifest.model_hash}]" if request.refiner_switch else None,
            "Refiner switch at": request.refiner_switch,
            "Skip layer guidance": _slg_text(request.skip_layer_guidance),
            "Step cache": step_cache_infotext(request.step_cache),  # a fast mode: the image is not the exact one
            "VAE decoder": "TAESD" if request.vae_decoder == "tiny" else None,  # a fast mode too
            "Tiled VAE": pipeline.manifest.components["vae_decoder_tile"].outputs[0].shape[-1] if request.vae_tiling else None,
            "U-Net": int8_infotext(pipeline.manifest, request),  # a fast mode: the int8 U-Net
            "Guidance stop": request.guidance_stop if request.guidance_stop is not None and request.guidance_stop < 1 else None,
            **dict(unit.infotext(index, pipeline.controlnets.model_hash(unit.model)) for index, unit in enumerate(request.control)),
            **(hires or {}),  # hires fix's settings (runtime.hires.HiresFix.infotext)
            "Lora hashes": pipeline.loras.infotext_hashes(),
            "Interrupted": stopped,  # "after k of n steps": the image is the x0 estimate of step k
            "Version": f"sdfast {__version__}",
        },
    )


def _slg_text(slg: SkipLayerGuidance | None) -> str | None:
    """The infotext's skip-layer guidance entry: layers, scale and the schedule's window."""
    if slg is None:
        return None
    return f"layers {'/'.join(map(str, slg.layers))} scale {slg.scale:g} from {slg.start:g} to {slg.stop:g}"
