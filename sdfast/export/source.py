"""A diffusers-format model folder: checked and fingerprinted (heavy side; each family's module loads it)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, TypeVar

from sdfast.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
T = TypeVar("T")


def read_model_index(folder: Path) -> dict:
    """model_index.json of a diffusers folder; a ConfigError in one line for anything else."""
    if not folder.exists():
        raise ConfigError(f"model folder '{folder}' does not exist (pass a diffusers folder, or a built-in model)")
    if not folder.is_dir():
        raise ConfigError(f"model '{folder}' is not a folder; sdfast export takes a diffusers-format folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConfigError(f"'{folder}' is not a diffusers model folder: it has no model_index.json")
    try:
        model_index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{index_path}: not valid JSON ({error})") from None
    if not isinstance(model_index, dict):
        raise ConfigError(f"{index_path}: not a model index (a JSON object)")
    return model_index


def check_model_folder(folder: Path, recipe, pipeline_class: str | None) -> None:
    """The folder has the component folders the recipe's family reads; ``pipeline_class`` (None: --family was given)
    is one the recipe exports."""
    classes = recipe.data["pipeline_classes"]
    if pipeline_class is not None and pipeline_class not in classes:
        raise ConfigError(f"'{folder}' holds a {pipeline_class}; the {recipe.family} recipe exports {', '.join(classes)}")
    missing = [name for name in recipe.data["model_folders"] if not (folder / name).is_dir()]
    if missing:
        raise ConfigError(f"'{folder}' lacks the component folder(s) {', '.join(missing)}")


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


def read_scheduler_config(folder: Path, flow_matching: bool = False) -> dict:
    """scheduler/scheduler_config.json, refused by name when sdfast cannot run it (read before any weights load).

    ``flow_matching``: the family's denoiser is trained for flow matching (SD3); the U-Net families take VP schedulers only.
    """
    from sdfast.runtime.request_check import read_scheduler_file
    from sdfast.sampling.registry import is_flow

    config = read_scheduler_file(folder / "scheduler" / "scheduler_config.json", ConfigError)
    if is_flow(config) != flow_matching:
        kind = "flow matching" if is_flow(config) else "a VP (DDPM) schedule"
        wanted = "flow-matching" if flow_matching else "VP (DDPM)"
        raise ConfigError(f"the model's scheduler is {config.get('_class_name')} ({kind}), but this model family samples with "
                          f"{wanted} schedulers")
    return config


def load_or_refuse(folder: Path, what: str, loader: Callable[[], T]) -> T:
    """``loader()``, its failure (of any type) said in one line as a bad folder; transformers and diffusers kept quiet."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # sdfast reports progress itself
        library.logging.set_verbosity_error()
        library.logging.disable_progress_bar()
    try:
        return loader()
    except Exception as error:  # noqa: BLE001 - any load failure is a bad folder, said in one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load {what} from '{folder}': {first_line}") from None
