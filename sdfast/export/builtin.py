"""Built-in random-weight Stable Diffusion 1.x, 2.x, XL and 3.5 pipelines, made locally from diffusers config classes.

``tiny`` has SD 1.x's structure at toy width and ``tiny-sd2`` SD 2.x's (OpenCLIP-style text encoder, linear
projections, upcast attention, v-prediction), for tests. ``sd15`` and ``sd21`` have SD 1.5's and SD 2.1's real
architectures and configs, so latency is real; their weights are random, so their images are noise. All are saved as
ordinary diffusers folders and cached under ``$SDFAST_CACHE`` (default ``~/.cache/sdfast``). Their tokenizer is
CLIP's real one (builtin_tokenizer.py), so prompts tokenize as on a real model; SD 2.x's pads with "!" (id 0).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from sdfast.export.built_once import built_once
from sdfast.export.builtin_tokenizer import CLIP_VOCAB_SIZE, bpe_data_path, write_tokenizer_files

BUILTIN_FORMAT = 4  # bump when what a built-in folder holds changes; stale caches are rebuilt
MARKER = "sdfast_builtin.json"

# stable-diffusion-v1-5's scheduler_config.json, key for key.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stable-diffusion-2-1's (768 px, v-prediction) scheduler_config.json, key for key.
SD21_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


SD_PIPELINE_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


@dataclass(frozen=True)
class BuiltinModel:
    """Configs of one built-in pipeline; every text encoder takes CLIP's 49408-token vocabulary (builtin_tokenizer.py)."""

    name: str
    description: str
    default_size: int
    seed: int
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict | None = field(default_factory=dict)  # None: the pipeline has no first text encoder (SDXL's refiner)
    pipeline_class: str = "StableDiffusionPipeline"
    scheduler: dict = field(default_factory=lambda: dict(SD15_SCHEDULER_CONFIG))  # written as the model ships it
    pad_token: str | None = None  # None: CLIP's (<|endoftext|>, SD 1.x); "!" for SD 2.x's OpenCLIP tokenizer
    text_encoder_2: dict | None = None  # SDXL's OpenCLIP-bigG with projection (CLIPTextModelWithProjection); pads with "!"
    pipeline_options: dict = field(default_factory=lambda: dict(SD_PIPELINE_OPTIONS))  # the pipeline class's own arguments
    transformer: dict | None = None  # SD3's MMDiT (SD3Transformer2DModel) in place of the U-Net
    text_encoder_class: str = "CLIPTextModel"  # SD3's first encoder has a projection too (CLIPTextModelWithProjection)
    text_encoder_3: dict | None = None  # SD3's T5 encoder (T5EncoderModel config), with a T5-style tokenizer


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny": BuiltinModel(
        name="tiny",
        description="SD 1.x structure at toy width (random weights), for tests",
        default_size=64,
        seed=0,
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=8, sample_size=64, scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        ),
    ),
}
# An inpainting variant of tiny: a 9-channel U-Net (latents, mask, masked-image latents), as SD 1.5 inpainting has.
BUILTIN_MODELS["tiny-inpaint"] = replace(
    BUILTIN_MODELS["tiny"], name="tiny-inpaint", description="tiny with a 9-channel inpainting U-Net (random weights), for tests",
    unet={**BUILTIN_MODELS["tiny"].unet, "in_channels": 9}, pipeline_class="StableDiffusionInpaintPipeline",
)
BUILTIN_MODELS |= {
    "sd15": BuiltinModel(
        name="sd15",
        description="Stable Diffusion 1.5 architecture and configs with RANDOM weights (real latency, noise images)",
        default_size=512,
        seed=0,
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", downsample_padding=1,
            flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, sample_size=512, act_fn="silu", scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
        ),
    ),
}

# SD 2.x: OpenCLIP ViT-H/14 in CLIPTextModel form (gelu, 23 of its 24 layers: the penultimate is the output), a U-Net
# with linear projections, per-block head counts and upcast attention (2.1 overflows fp16 attention), v-prediction.
BUILTIN_MODELS |= {
    "tiny-sd2": replace(
        BUILTIN_MODELS["tiny"], name="tiny-sd2", description="SD 2.x structure at toy width (random weights), for tests", seed=3,
        unet={**BUILTIN_MODELS["tiny"].unet, "attention_head_dim": (2, 4), "use_linear_projection": True, "upcast_attention": True},
        text_encoder={**BUILTIN_MODELS["tiny"].text_encoder, "hidden_act": "gelu", "projection_dim": 16},
        scheduler=dict(SD21_SCHEDULER_CONFIG), pad_token="!",
    ),
    "sd21": BuiltinModel(
        name="sd21",
        description="Stable Diffusion 2.1 (768, v-prediction) architecture and configs with RANDOM weights (real latency, noise images)",
        default_size=768,
        seed=0,
        unet={**BUILTIN_MODELS["sd15"].unet, "sample_size": 96, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
              "use_linear_projection": True, "upcast_attention": True},
        vae={**BUILTIN_MODELS["sd15"].vae, "sample_size": 768},
        text_encoder=dict(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5,
        ),
        scheduler=dict(SD21_SCHEDULER_CONFIG), pad_token="!",
    ),
}


# stable-diffusion-xl-base-1.0's scheduler_config.json, key for key; SDXL Turbo's differs in class and spacing.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_TURBO_SCHEDULER_CONFIG = {**SDXL_SCHEDULER_CONFIG, "_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}
SDXL_BASE_OPTIONS = {"force_zeros_for_empty_prompt": True}  # model_index.json of the base (and Turbo)
SDXL_REFINER_OPTIONS = {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}  # the refiner's

# SDXL: CLIP ViT-L (penultimate layer) and OpenCLIP ViT-bigG with projection (penultimate layer, pooled text_embeds),
# a U-Net conditioned on text_embeds and time_ids (addition_embed_type "text_time"), a VAE scaled by 0.13025. The
# refiner has only the second encoder, a wider 4-level U-Net and aesthetic-score time ids.
_TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8, cross_attention_dim=64,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids x addition_time_embed_dim + the pooled width
)
_TINY_OPENCLIP = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
)
_SDXL_VAE = {**BUILTIN_MODELS["sd15"].vae, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
BUILTIN_MODELS |= {
    "tiny-sdxl": replace(
        BUILTIN_MODELS["tiny"], name="tiny-sdxl", description="SDXL base structure at toy width (random weights), for tests",
        seed=5, unet=_TINY_SDXL_UNET, vae={**BUILTIN_MODELS["tiny"].vae, "scaling_factor": 0.13025, "force_upcast": True},
        text_encoder_2=_TINY_OPENCLIP, pipeline_class="StableDiffusionXLPipeline", scheduler=dict(SDXL_SCHEDULER_CONFIG),
        pipeline_options=dict(SDXL_BASE_OPTIONS),
    ),
    "sdxl": BuiltinModel(
        name="sdxl",
        description="SDXL base 1.0 architecture and configs with RANDOM weights (real latency, noise images)",
        default_size=1024,
        seed=0,
        unet=dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        ),
        vae=_SDXL_VAE,
        text_encoder={**BUILTIN_MODELS["sd15"].text_encoder},
        text_encoder_2=dict(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5,
        ),
        pipeline_class="StableDiffusionXLPipeline", scheduler=dict(SDXL_SCHEDULER_CONFIG), pipeline_options=dict(SDXL_BASE_OPTIONS),
    ),
}
BUILTIN_MODELS |= {
    "tiny-sdxl-turbo": replace(
        BUILTIN_MODELS["tiny-sdxl"], name="tiny-sdxl-turbo", scheduler=dict(SDXL_TURBO_SCHEDULER_CONFIG),
        description="tiny-sdxl with SDXL Turbo's scheduler (Euler a, trailing spacing), for tests",
    ),
    "sdxl-turbo": replace(
        BUILTIN_MODELS["sdxl"], name="sdxl-turbo", default_size=512, scheduler=dict(SDXL_TURBO_SCHEDULER_CONFIG),
        description="SDXL Turbo architecture and scheduler (Euler a, trailing) with RANDOM weights, 512 px",
    ),
    "tiny-sdxl-inpaint": replace(
        BUILTIN_MODELS["tiny-sdxl"], name="tiny-sdxl-inpaint", unet={**_TINY_SDXL_UNET, "in_channels": 9},
        description="tiny-sdxl with a 9-channel inpainting U-Net (random weights), for tests", pipeline_class="StableDiffusionXLInpaintPipeline",
    ),
    "tiny-sdxl-refiner": replace(
        BUILTIN_MODELS["tiny-sdxl"], name="tiny-sdxl-refiner", seed=9, text_encoder=None,
        unet={**_TINY_SDXL_UNET, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 5 * 8 + 32},
        description="SDXL refiner structure at toy width (random weights), for tests",
        pipeline_class="StableDiffusionXLImg2ImgPipeline", pipeline_options=dict(SDXL_REFINER_OPTIONS),
    ),
    "sdxl-refiner": replace(
        BUILTIN_MODELS["sdxl"], name="sdxl-refiner", text_encoder=None,
        unet={**BUILTIN_MODELS["sdxl"].unet, "block_out_channels": (384, 768, 1536, 1536),
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              "attention_head_dim": (6, 12, 24, 24), "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
              "projection_class_embeddings_input_dim": 2560},
        description="SDXL refiner 1.0 architecture and configs with RANDOM weights (real latency, noise images)",
        pipeline_class="StableDiffusionXLImg2ImgPipeline", pipeline_options=dict(SDXL_REFINER_OPTIONS),
    ),
}

# SD3.5: CLIP-L and OpenCLIP-bigG, both with projection (pooled 768 + 1280 = 2048), T5-XXL left out (the pipeline puts
# zeros in its place), the MMDiT transformer on 2x2 patches of a 16-channel VAE (scaling 1.5305, shift 0.0609), and
# flow matching with shift 3 (stable-diffusion-3.5-medium's and -large's scheduler_config.json).
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SD3_PIPELINE_OPTIONS = {"text_encoder_3": None, "tokenizer_3": None}
_SD3_VAE = {**BUILTIN_MODELS["sd15"].vae, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
            "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
BUILTIN_MODELS |= {
    "tiny-sd3": replace(
        BUILTIN_MODELS["tiny"], name="tiny-sd3", seed=11, unet={}, text_encoder_class="CLIPTextModelWithProjection",
        description="SD3.5 Medium structure at toy width (random weights, no T5), for tests",
        transformer=dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                         joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                         pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        vae={**_SD3_VAE, **{k: BUILTIN_MODELS["tiny"].vae[k] for k in ("layers_per_block", "block_out_channels", "norm_num_groups")},
             "sample_size": 64},
        text_encoder_2=dict(_TINY_OPENCLIP), pipeline_class="StableDiffusion3Pipeline", scheduler=dict(SD3_SCHEDULER_CONFIG),
        pipeline_options=dict(SD3_PIPELINE_OPTIONS),
    ),
    "sd35m": BuiltinModel(
        name="sd35m",
        description="SD3.5 Medium architecture and configs (MMDiT with dual attention, no T5) with RANDOM weights (real latency, noise images)",
        default_size=1024, seed=0, unet={}, vae=_SD3_VAE, text_encoder_class="CLIPTextModelWithProjection",
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                         joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        text_encoder={**BUILTIN_MODELS["sd15"].text_encoder},
        text_encoder_2=dict(BUILTIN_MODELS["sdxl"].text_encoder_2),
        pipeline_class="StableDiffusion3Pipeline", scheduler=dict(SD3_SCHEDULER_CONFIG), pipeline_options=dict(SD3_PIPELINE_OPTIONS),
    ),
}
BUILTIN_MODELS["tiny-sd3-t5"] = replace(
        BUILTIN_MODELS["tiny-sd3"], name="tiny-sd3-t5", seed=13,
        description="SD3 (Medium 3.0) structure at toy width: no dual attention or q/k norm, with a small T5 encoder (random weights), for tests",
        transformer={**BUILTIN_MODELS["tiny-sd3"].transformer, "dual_attention_layers": (), "qk_norm": None},
        text_encoder_3=dict(vocab_size=1000, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                            feed_forward_proj="gated-gelu"),
        pipeline_options={},
)


def cache_root() -> Path:
    return Path(os.environ.get("SDFAST_CACHE", Path.home() / ".cache" / "sdfast"))


def _descriptor(model: BuiltinModel) -> dict:
    import diffusers
    import torch

    return {"format": BUILTIN_FORMAT, "model": asdict(model), "torch": torch.__version__, "diffusers": diffusers.__version__}


def ensure_builtin(name: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """The folder of a built-in model, built (and cached) if no up-to-date copy exists."""
    model = BUILTIN_MODELS[name]
    folder = cache_root() / "models" / name
    descriptor = json.loads(json.dumps(_descriptor(model)))
    marker = folder / MARKER

    def build(staging: Path) -> None:
        log(f"building built-in model '{name}': {model.description}")
        save_builtin(model, staging)
        (staging / MARKER).write_text(json.dumps(descriptor, indent=2))  # written last: the folder is complete

    if not _is_current(marker, descriptor):
        bpe_data_path()  # CLIP's vocabulary must be at hand before anything is created (a one-line ExportError if not)
    return built_once(folder, lambda: _is_current(marker, descriptor), build)


def _is_current(marker: Path, descriptor: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == descriptor
    except (OSError, ValueError):
        return False


def save_builtin(model: BuiltinModel, folder: Path) -> None:
    """Create the random-weight pipeline from configs and save it as a diffusers folder."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # before diffusers' pipeline imports probe optional image processors
    transformers.logging.disable_progress_bar()
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()

    raw_tokenizer_dir = folder / "_raw_tokenizer"
    vocab_path, merges_path = write_tokenizer_files(raw_tokenizer_dir)
    components = {"text_encoder": None, "tokenizer": None}  # SDXL's refiner has no first text encoder
    if model.text_encoder is not None:
        components["tokenizer"], components["text_encoder"] = _text_encoder(
            getattr(transformers, model.text_encoder_class), model.text_encoder, model.pad_token, vocab_path, merges_path, model.seed)
    if model.text_encoder_2 is not None:
        from transformers import CLIPTextModelWithProjection

        components["tokenizer_2"], components["text_encoder_2"] = _text_encoder(
            CLIPTextModelWithProjection, model.text_encoder_2, "!", vocab_path, merges_path, model.seed + 3)
    if model.text_encoder_3 is not None:
        from transformers import T5Config, T5EncoderModel

        from sdfast.export.builtin_tokenizer import t5_tokenizer

        components["tokenizer_3"] = t5_tokenizer(model.text_encoder_3["vocab_size"])
        torch.manual_seed(model.seed + 4)
        components["text_encoder_3"] = T5EncoderModel(T5Config(**model.text_encoder_3, pad_token_id=0, eos_token_id=1)).eval()
    torch.manual_seed(model.seed + 1)
    if model.transformer is not None:
        components["transformer"] = diffusers.SD3Transformer2DModel(**model.transformer).eval()
    else:
        components["unet"] = UNet2DConditionModel(**model.unet).eval()
    torch.manual_seed(model.seed + 2)
    components["vae"] = AutoencoderKL(**model.vae).eval()
    components["scheduler"] = getattr(diffusers, model.scheduler["_class_name"]).from_config(model.scheduler)
    pipeline = getattr(diffusers, model.pipeline_class)(**components, **model.pipeline_options)
    pipeline.save_pretrained(folder, safe_serialization=True)
    # The scheduler file as the model ships it (diffusers would drop keys its class does not take, such as clip_sample).
    scheduler_config = {**model.scheduler, "_diffusers_version": json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_diffusers_version"]}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    for tokenizer_dir in ("tokenizer", "tokenizer_2"):  # also CLIP's classic files, for older tokenizer loaders
        if (folder / tokenizer_dir).is_dir():
            for path in (vocab_path, merges_path):
                shutil.copy(path, folder / tokenizer_dir / path.name)
    shutil.rmtree(raw_tokenizer_dir)
    (folder / "README.md").write_text(
        f"# sdfast built-in model '{model.name}'\n\n{model.description}.\n\n"
        "The weights are RANDOM (seeded): this folder has a real architecture for testing and timing, "
        "and its images are noise.\n"
    )


def _text_encoder(model_class, config: dict, pad_token: str | None, vocab_path: Path, merges_path: Path, seed: int):
    """(tokenizer, text encoder) of CLIP's real vocabulary, the encoder's weights random from ``seed``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), **({"pad_token": pad_token} if pad_token else {}))
    tokenizer.model_max_length = config["max_position_embeddings"]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return tokenizer, model_class(CLIPTextConfig(**config, **special)).eval()
