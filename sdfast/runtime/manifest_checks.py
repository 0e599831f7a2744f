"""manifest.json's structure, checked once at read so that no later lookup can fail (sdfast.runtime.manifest)."""
from __future__ import annotations

from pathlib import Path

from sdfast.runtime.manifest import ROLES, confined, size_key

# What the runtime reads, and the type it must have: checked once, so no later lookup can fail.
_REQUIRED = {
    "geometry": {"height": int, "width": int, "batch": int, "guidance": bool, "unet_batch": int, "latent_channels": int,
                 "latent_height": int, "latent_width": int, "text_length": int, "max_text_chunks": int},
    "model": {"unet_in_channels": int, "text_layers": int},
    "latent": {"channels": int, "factor": int, "scaling_factor": (int, float), "shift_factor": (int, float)},
    "parametrization": {"prediction_type": str},
    "tokenizers": {},
    "scheduler": {"file": str, "files": dict},
    "source": {"name": str, "fingerprint": str},
    "components": {},
    "dynamic_dims": {},
}
_TOKENIZER_FIELDS = {"file": str, "files": dict, "bos_id": int, "eos_id": int, "pad_id": int, "max_length": int}
_TENSOR_DTYPES = ("float32", "float16", "int64", "int32")


def check_structure(data: dict, root: Path) -> None:
    """Raise ValueError (read_manifest makes it an EngineError) for anything the runtime reads that is missing or malformed."""
    if not isinstance(data.get("family"), str):
        raise ValueError("'family' is missing or not a string")
    for section, fields in _REQUIRED.items():
        if not isinstance(data.get(section), dict):
            raise ValueError(f"'{section}' must be an object")
        for field_name, kind in fields.items():
            value = data[section].get(field_name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"'{section}.{field_name}' is missing or of the wrong type")
    for field_name, value in data["geometry"].items():
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"'geometry.{field_name}' must be positive")
    for feeds, tokenizer in data["tokenizers"].items():
        t5 = isinstance(tokenizer, dict) and tokenizer.get("kind") == "t5"  # SD3's T5: no BOS, its own length
        for field_name, kind in _TOKENIZER_FIELDS.items():
            if t5 and field_name == "bos_id" and tokenizer.get(field_name) is None:
                continue
            if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get(field_name), kind) or isinstance(tokenizer.get(field_name), bool):
                raise ValueError(f"tokenizer of '{feeds}': '{field_name}' is missing or of the wrong type")
        if t5 and not 2 <= tokenizer["max_length"] <= 512:
            raise ValueError(f"tokenizer of '{feeds}': a T5 'max_length' must be from 2 to 512")
        if not t5 and not 3 <= tokenizer["max_length"] == data["geometry"]["text_length"]:
            raise ValueError(f"tokenizer of '{feeds}': 'max_length' must equal 'geometry.text_length' (at least 3)")
        if not isinstance(data["components"].get(feeds), dict) or data["components"][feeds].get("role") != "text_encoder":
            raise ValueError(f"a tokenizer feeds '{feeds}', which is not a text-encoder component")
        _check_files(tokenizer["files"], root)
        if tokenizer["file"] not in tokenizer["files"]:
            raise ValueError(f"tokenizer of '{feeds}': its file is not among its hashed files")
    for name, dim in data["dynamic_dims"].items():
        if not isinstance(dim, dict) or not all(
            isinstance(dim.get(k), int) and not isinstance(dim[k], bool) and dim[k] > 0 for k in ("multiple_of", "min", "max")
        ) or dim["min"] > dim["max"]:
            raise ValueError(f"dynamic dim '{name}' needs positive integers multiple_of, min <= max")
    _check_files(data["scheduler"]["files"], root)
    if data["scheduler"]["file"] not in data["scheduler"]["files"]:
        raise ValueError("'scheduler.file' is not among its hashed files")
    for name, info in data["components"].items():
        _check_graph_files(f"component '{name}'", info, root)
        if info.get("role") not in ROLES:
            raise ValueError(f"component '{name}': 'role' must be one of {', '.join(ROLES)}")
        if not isinstance(info.get("variants", {}), dict):
            raise ValueError(f"component '{name}': 'variants' must be an object")
        for backend, variant in info.get("variants", {}).items():
            _check_graph_files(f"component '{name}', variant '{backend}'", variant, root)
        _check_tensors(f"component '{name}'", info, data)
    _check_sizes(data, root)
    denoisers = [name for name, info in data["components"].items() if info.get("role") == "denoiser"]
    if len(denoisers) != 1:
        raise ValueError(f"there must be exactly one component with role 'denoiser', not {len(denoisers)}")


def _check_tensors(label: str, entry: dict, data: dict) -> None:
    """An entry's inputs and outputs: each a name, a shape of positive sizes or declared dynamic dims, a known dtype."""
    for key in ("inputs", "outputs"):
        if not isinstance(entry.get(key), list):
            raise ValueError(f"{label}: '{key}' must be a list")
    for tensor in entry["inputs"] + entry["outputs"]:
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        shape_ok = isinstance(shape, list) and all(
            (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and d in data["dynamic_dims"]) for d in shape)
        if not shape_ok or not isinstance(tensor.get("name"), str) or tensor.get("dtype") not in _TENSOR_DTYPES:
            raise ValueError(f"{label}: tensor '{tensor.get('name') if isinstance(tensor, dict) else tensor}' needs a name, a shape "
                             f"of positive sizes or declared dynamic dims, and a dtype of {_TENSOR_DTYPES}")


_SIZE_FIELDS = {"file", "files", "inputs", "outputs", "flops", "parity", "variants"}  # what a per-size entry may set


def _check_sizes(data: dict, root: Path) -> None:
    """'sizes' (format 5): the image sizes, the geometry's first; each per-size component entry names one of them."""
    sizes = data.get("sizes")
    if sizes is None:
        keys = set()
    else:
        if not isinstance(sizes, list) or not sizes:
            raise ValueError("'sizes' must be a non-empty list")
        for size in sizes:
            if not isinstance(size, dict) or not all(isinstance(size.get(k), int) and not isinstance(size[k], bool) and size[k] > 0
                                                     for k in ("width", "height", "latent_width", "latent_height")):
                raise ValueError("each of 'sizes' needs positive integers width, height, latent_width, latent_height")
        if (sizes[0]["width"], sizes[0]["height"]) != (data["geometry"]["width"], data["geometry"]["height"]):
            raise ValueError("the first of 'sizes' must be the geometry's size")
        keys = {size_key(size["width"], size["height"]) for size in sizes}
        if len(keys) != len(sizes):
            raise ValueError("'sizes' lists a size twice")
    for name, info in data["components"].items():
        per_size = info.get("sizes", {})
        if not isinstance(per_size, dict):
            raise ValueError(f"component '{name}': 'sizes' must be an object")
        extra = set(per_size) - keys
        if extra or (per_size and set(per_size) != keys - {size_key(data["geometry"]["width"], data["geometry"]["height"])}):
            raise ValueError(f"component '{name}': its sizes {sorted(per_size)} are not the engine dir's other sizes")
        for key, entry in per_size.items():
            _check_graph_files(f"component '{name}' at {key}", entry, root)
            if not isinstance(entry, dict) or set(entry) - _SIZE_FIELDS:
                raise ValueError(f"component '{name}' at {key}: only {', '.join(sorted(_SIZE_FIELDS))} may differ by size")
            _check_tensors(f"component '{name}' at {key}", entry, data)
            for backend, variant in entry.get("variants", {}).items():
                _check_graph_files(f"component '{name}' at {key}, variant '{backend}'", variant, root)
        shared = info.get("shared_weights")
        if shared is not None:
            if not isinstance(shared, dict) or not all(isinstance(shared.get(k), str) for k in ("file", "index")):
                raise ValueError(f"component '{name}': 'shared_weights' needs 'file', 'index' and 'files'")
            _check_files(shared.get("files"), root)
            if shared["index"] not in shared["files"] or shared["file"] not in shared["files"]:
                raise ValueError(f"component '{name}': its shared weights and their index must be among its hashed files")
    if len(keys) > 1 and not data["components"].get(_denoiser_name(data), {}).get("sizes"):
        raise ValueError("an engine dir with several sizes needs the denoiser's graphs at each size")


def _denoiser_name(data: dict) -> str | None:
    return next((name for name, info in data["components"].items() if isinstance(info, dict) and info.get("role") == "denoiser"), None)


def _check_graph_files(label: str, entry: dict, root: Path) -> None:
    """A component's (or variant's) 'file' and its hashed 'files'; the graph sits at the engine dir's top level."""
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) or not isinstance(entry.get("file"), str):
        raise ValueError(f"{label} must have 'file' and 'files'")
    _check_files(entry["files"], root)
    if entry["file"] not in entry["files"]:
        raise ValueError(f"{label}: its file is not among its hashed files")
    if len(Path(entry["file"]).parts) != 1:  # backends find the engine dir, and a variant, beside the graph they load
        raise ValueError(f"{label}: its file '{entry['file']}' must be at the engine dir's top level")


def _check_files(files: dict, root: Path) -> None:
    if not isinstance(files, dict):
        raise ValueError("'files' must be an object")
    for name, entry in files.items():
        confined(root, name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise ValueError(f"file entry '{name}' needs 'sha256' and 'bytes'")
