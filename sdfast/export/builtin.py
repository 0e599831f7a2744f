"""Built-in random-weight Stable Diffusion 1.x and 2.x pipelines, made locally from diffusers config classes.

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
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from sdfast.export.builtin_tokenizer import CLIP_VOCAB_SIZE, bpe_data_path, write_tokenizer_files

BUILTIN_FORMAT = 3  # bump when what a built-in folder holds changes; stale caches are rebuilt
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


@dataclass(frozen=True)
class BuiltinModel:
    """Configs of one built-in pipeline; every text encoder takes CLIP's 49408-token vocabulary (builtin_tokenizer.py)."""

    name: str
    description: str
    default_size: int
    seed: int
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)
    pipeline_class: str = "StableDiffusionPipeline"
    scheduler: dict = field(default_factory=lambda: dict(SD15_SCHEDULER_CONFIG))  # written as the model ships it
    pad_token: str | None = None  # None: CLIP's (<|endoftext|>, SD 1.x); "!" for SD 2.x's OpenCLIP tokenizer


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
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == descriptor:
                return folder
        except (OSError, ValueError):
            pass
    bpe_data_path()  # CLIP's vocabulary must be at hand before anything is built (a one-line ExportError if not)
    log(f"building built-in model '{name}': {model.description}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        save_builtin(model, staging)
        (staging / MARKER).write_text(json.dumps(descriptor, indent=2))  # written last: the folder is complete
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_builtin(model: BuiltinModel, folder: Path) -> None:
    """Create the random-weight pipeline from configs and save it as a diffusers folder."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # before diffusers' pipeline imports probe optional image processors
    transformers.logging.disable_progress_bar()
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()

    raw_tokenizer_dir = folder / "_raw_tokenizer"
    vocab_path, merges_path = write_tokenizer_files(raw_tokenizer_dir)
    tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), **({"pad_token": model.pad_token} if model.pad_token else {}))
    tokenizer.model_max_length = model.text_encoder["max_position_embeddings"]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    torch.manual_seed(model.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**model.text_encoder, **special)).eval()
    torch.manual_seed(model.seed + 1)
    unet = UNet2DConditionModel(**model.unet).eval()
    torch.manual_seed(model.seed + 2)
    vae = AutoencoderKL(**model.vae).eval()
    scheduler = getattr(diffusers, model.scheduler["_class_name"]).from_config(model.scheduler)

    pipeline = getattr(diffusers, model.pipeline_class)(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    # The scheduler file as the model ships it (diffusers would drop keys its class does not take, such as clip_sample).
    scheduler_config = {**model.scheduler, "_diffusers_version": json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_diffusers_version"]}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    for path in (vocab_path, merges_path):  # also CLIP's classic files, for older tokenizer loaders
        shutil.copy(path, folder / "tokenizer" / path.name)
    shutil.rmtree(raw_tokenizer_dir)
    (folder / "README.md").write_text(
        f"# sdfast built-in model '{model.name}'\n\n{model.description}.\n\n"
        "The weights are RANDOM (seeded): this folder has a real architecture for testing and timing, "
        "and its images are noise.\n"
    )
