"""A diffusers-format Stable Diffusion folder: checked, fingerprinted and loaded in PyTorch (heavy side)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sdfast.errors import ConfigError
from sdfast.sampling.registry import check_supported

REQUIRED_SUBFOLDERS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def check_model_folder(folder: Path, pipeline_classes: list[str]) -> dict:
    """model_index.json of a supported pipeline and the component folders it needs; returns model_index."""
    if not folder.exists():
        raise ConfigError(f"model folder '{folder}' does not exist (pass a diffusers folder, or 'tiny' or 'sd15')")
    if not folder.is_dir():
        raise ConfigError(f"model '{folder}' is not a folder; sdfast export takes a diffusers-format folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConfigError(f"'{folder}' is not a diffusers model folder: it has no model_index.json")
    try:
        model_index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{index_path}: not valid JSON ({error})") from None
    pipeline_class = model_index.get("_class_name")
    if pipeline_class not in pipeline_classes:
        raise ConfigError(f"'{folder}' holds a {pipeline_class}; this recipe exports {', '.join(pipeline_classes)}")
    missing = [name for name in REQUIRED_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise ConfigError(f"'{folder}' lacks the component folder(s) {', '.join(missing)}")
    return model_index


def weights_fingerprint(folder: Path) -> str:
    """sha256 over every weight file of the folder (relative path and bytes), so re-saved copies match."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ConfigError(f"'{folder}' has no weight files (*.safetensors or *.bin)")
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class LoadedModel:
    """The PyTorch components of a Stable Diffusion folder, fp32, in eval mode."""

    folder: Path
    text_encoder: object
    unet: object
    vae: object
    tokenizer: object
    scheduler_config: dict


def load_model(folder: Path) -> LoadedModel:
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for library in (diffusers, transformers):  # sdfast reports progress itself
        library.logging.set_verbosity_error()
        library.logging.disable_progress_bar()

    def load(what: str, loader):
        try:
            return loader()
        except Exception as error:  # noqa: BLE001 - any load failure is a bad folder, said in one line
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"cannot load {what} from '{folder}': {first_line}") from None

    scheduler_path = folder / "scheduler" / "scheduler_config.json"  # read first: a scheduler sdfast cannot run stops the export
    try:
        scheduler_config = json.loads(scheduler_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {scheduler_path}: {error}") from None
    if not isinstance(scheduler_config, dict):
        raise ConfigError(f"{scheduler_path}: not a scheduler config (a JSON object)")
    check_supported(scheduler_config)
    text_encoder = load("text_encoder", lambda: CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32))
    unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32))
    vae = load("vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32))
    tokenizer = load("tokenizer", lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    return LoadedModel(folder, text_encoder, unet, vae, tokenizer, scheduler_config)
