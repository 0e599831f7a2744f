"""manifest.json: what an engine dir holds, read and checked before anything is loaded."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sdfast.errors import EngineError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "sdfast-engine"
FORMAT_VERSION = 5  # 3: tokenizers by the component they feed, component roles, the latent block, the parametrization;
# 4: the U-Net's ControlNet residual inputs and "controlnet" components (a version-3 dir, without them, still loads)
# 5: several image sizes ('sizes', per-size component entries over one shared data file per component)
READABLE_VERSIONS = (3, 4, 5)
ROLES = ("text_encoder", "denoiser", "vae_decoder", "vae_encoder", "controlnet")  # what a component does; a family may have several text encoders
_HASH_CHUNK = 8 << 20


def confined(root: Path, relative: str) -> Path:
    """``root / relative``, refused unless it stays inside ``root``: relative, no '..', and no link leading out of it.

    The one gate for every path an engine dir names (manifest files, variants, TensorRT plans): the error says nothing
    about what lies outside (no size, no existence), since the manifest may come from someone else.
    """
    pure = Path(relative) if isinstance(relative, str) and "\0" not in relative else None
    if pure is None or pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise EngineError(f"engine dir {root}: file name {relative!r} is not a plain relative path inside it")
    path = Path(root) / pure
    real_root, real = os.path.realpath(root), os.path.realpath(path)  # every symlink on the way followed
    if os.path.commonpath([real_root, real]) != real_root:
        raise EngineError(f"engine dir {root}: '{relative}' leads out of the engine dir (a link to elsewhere)")
    return path


def sha256_file(path: Path, on_chunk: Callable[[int], None] | None = None) -> str:
    """The file's sha256; ``on_chunk(bytes_read)`` after each chunk (progress on multi-GB weights)."""
    digest, read = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            read += len(chunk)
            if on_chunk:
                on_chunk(read)
    return digest.hexdigest()


@dataclass(frozen=True)
class DynamicDim:
    """An axis the engine takes at any multiple of ``multiple_of`` from ``min`` to ``max`` (the prompt's tokens)."""

    name: str
    multiple_of: int
    min: int
    max: int

    def accepts(self, size: int) -> bool:
        return self.min <= size <= self.max and size % self.multiple_of == 0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str names one of the manifest's dynamic_dims
    dtype: str

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        return cls(name=data["name"], shape=tuple(d if isinstance(d, str) else int(d) for d in data["shape"]), dtype=data["dtype"])


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    file: str
    files: dict[str, dict]  # every file of the component (graph and external data): {"sha256", "bytes"}
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str
    dynamic: dict[str, DynamicDim]  # the manifest's dynamic axes, by name
    variants: dict[str, dict] = field(default_factory=dict)  # backend -> {"file", "files", "optimization"}: pre-optimized for it
    role: str | None = None  # one of ROLES (read from the manifest): the backends treat the denoiser (loop, IO binding, CUDA graphs) apart
    optional: bool = False  # the engine dir may lack it (the VAE encoder: img2img and inpainting only)
    parameter_map: dict | None = None  # {"file", "files", "graphs"}: where LoRA-patchable weights are in each graph (None: not recorded)
    shared_weights: dict | None = None  # {"file", "index", "files"}: one data file for the graphs of every size (None: per graph)
    sizes: dict[str, dict] = field(default_factory=dict)  # "WxH" -> the entry's fields at that image size (other than the default)

    def input(self, name: str) -> TensorSpec:
        """The input called ``name``; an engine without it was not made by this sdfast's export."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise EngineError(f"{self.name}: the manifest lists no input '{name}' (re-export the model)")

    @classmethod
    def from_json(cls, name: str, data: dict, dynamic: dict | None = None) -> "ComponentInfo":
        return cls(
            name=name,
            file=data["file"],
            files=data["files"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            precision=data["precision"],
            dynamic={key: DynamicDim(key, int(d["multiple_of"]), int(d["min"]), int(d["max"])) for key, d in (dynamic or {}).items()},
            variants=dict(data.get("variants", {})),
            role=data["role"],
            optional=bool(data.get("optional", False)),
            parameter_map=data.get("parameter_map"),
            shared_weights=data.get("shared_weights"),
            sizes=dict(data.get("sizes", {})),
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest, with the engine dir it came from."""

    root: Path
    data: dict
    components: dict[str, ComponentInfo]

    @property
    def geometry(self) -> dict:
        return self.data["geometry"]

    @property
    def denoiser(self) -> str:
        """The name of the one component whose role is 'denoiser' (the U-Net; SD3's transformer)."""
        return next(name for name, info in self.components.items() if info.role == "denoiser")

    @property
    def denoiser_label(self) -> str:
        """The denoiser as people name it, for messages and timing lines: "U-Net", or SD3's "transformer"."""
        return "U-Net" if self.denoiser == "unet" else self.denoiser

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def tokenizers(self) -> dict[str, dict]:
        """The tokenizers, keyed by the text-encoder component each one feeds."""
        return self.data["tokenizers"]

    @property
    def latent(self) -> dict:
        """channels, factor, scaling_factor, shift_factor: the VAE's latent space (never inline constants)."""
        return self.data["latent"]

    @property
    def prediction_type(self) -> str:
        return self.data["parametrization"]["prediction_type"]

    @property
    def family(self) -> str:
        """The model family the engine dir was exported as (the runtime module that runs it)."""
        return self.data["family"]

    @property
    def model_hash(self) -> str:
        """A1111's short model hash: the first 10 hex digits of the weights' fingerprint."""
        return self.data["source"]["fingerprint"].split(":")[-1][:10]

    @property
    def model_name(self) -> str:
        return self.data["source"]["name"]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The image sizes the engine dir serves, (width, height), its default size first (that of its geometry)."""
        listed = self.data.get("sizes") or [self.geometry]
        return [(int(size["width"]), int(size["height"])) for size in listed]

    @property
    def sizes_text(self) -> str:
        """The sizes as people write them: "512x512, 768x512" (width x height)."""
        return ", ".join(size_key(*size) for size in self.sizes)

    def at_size(self, width: int, height: int) -> "Manifest":
        """This manifest as an engine dir of ``width`` x ``height`` alone: its geometry and its per-size components
        (the U-Net, the VAE) at that size; the text encoders, tokenizers and scheduler as they are."""
        if (width, height) == (self.geometry["width"], self.geometry["height"]):
            return self
        if self.data.get("sized_view"):
            raise EngineError(f"engine dir {self.root}: ask the engine dir's own manifest for size {size_key(width, height)}")
        listed = next((size for size in self.data.get("sizes") or [] if (size["width"], size["height"]) == (width, height)), None)
        if listed is None:
            raise EngineError(f"engine dir {self.root} has no {size_key(width, height)} graphs (it has {self.sizes_text})")
        key = size_key(width, height)
        data = {**self.data, "geometry": {**self.geometry, **listed}, "sized_view": True, "components": {}}
        for name, entry in self.data["components"].items():
            if entry.get("role") == "controlnet" and not entry.get("sizes"):
                continue  # added by export-controlnet, at the default size only
            plain = {field_name: value for field_name, value in entry.items() if field_name != "sizes"}
            if entry.get("sizes"):  # an entry of a size-dependent component lacks no size (read_manifest checks)
                plain = {**plain, "variants": {}, "parity": None, **entry["sizes"][key]}
            data["components"][name] = plain
        components = {name: ComponentInfo.from_json(name, info, data["dynamic_dims"]) for name, info in data["components"].items()}
        return Manifest(root=self.root, data=data, components=components)

    def path(self, relative: str) -> Path:
        """The file ``relative`` names, confined to the engine dir (see ``confined``)."""
        return confined(self.root, relative)

    def listed_files(self) -> dict[str, dict]:
        """Every file the engine dir must hold: components, tokenizer and scheduler, with sha256 and size."""
        files = {}
        for component in self.components.values():
            files.update(component.files)
            for variant in component.variants.values():
                files.update(variant["files"])
            if component.parameter_map:
                files.update(component.parameter_map["files"])
            if component.shared_weights:
                files.update(component.shared_weights["files"])
            for sized in component.sizes.values():
                files.update(sized["files"])
                for variant in sized.get("variants", {}).values():
                    files.update(variant["files"])
        for tokenizer in self.tokenizers.values():
            files.update(tokenizer["files"])
        files.update(self.data["scheduler"]["files"])
        return files

    def verify_files(self, full: bool = True, files: dict[str, dict] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> None:
        """Every file of ``files`` (default: all listed) is present with its size, and (``full``) its sha256.

        ``progress(bytes_done, bytes_total)`` is called as the files are hashed.
        """
        files = self.listed_files() if files is None else files
        total, done = sum(entry["bytes"] for entry in files.values()), 0
        for relative, expected in files.items():
            path = self.path(relative)
            if not path.is_file():
                raise EngineError(f"engine dir {self.root}: file '{relative}' is missing")
            try:
                size = path.stat().st_size
                if size != expected["bytes"]:
                    raise EngineError(
                        f"engine dir {self.root}: '{relative}' is {size} bytes, the manifest says {expected['bytes']} (corrupt or replaced)"
                    )
                if full:
                    on_chunk = (lambda n, base=done: progress(base + n, total)) if progress else None
                    if sha256_file(path, on_chunk) != expected["sha256"]:
                        raise EngineError(f"engine dir {self.root}: '{relative}' does not match its sha256 in the manifest (corrupt or replaced)")
            except OSError as error:
                raise EngineError(f"engine dir {self.root}: cannot read '{relative}': {error.strerror or error}") from None
            done += size
            if progress:
                progress(done, total)


def size_key(width: int, height: int) -> str:
    """An image size as A1111 and the manifest write it: width x height."""
    return f"{width}x{height}"


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Parse and check the format of ``engine_dir/manifest.json``; raise EngineError in one line otherwise."""
    root = Path(engine_dir)
    if not root.exists():
        raise EngineError(f"engine dir '{root}' does not exist (make one with 'sdfast export')")
    if not root.is_dir():
        raise EngineError(f"'{root}' is not a directory; an engine dir is what 'sdfast export --out' writes")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"'{root}' is not an sdfast engine dir: it has no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EngineError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise EngineError(f"{path}: not an sdfast engine manifest")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise EngineError(
            f"{path}: engine format version {version}, this sdfast reads versions {READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]}; "
            + ("re-export the model" if isinstance(version, int) and version < READABLE_VERSIONS[0] else "update sdfast or re-export the model")
        )
    from sdfast.runtime.families import FAMILY_NAMES

    if isinstance(data.get("family"), str) and data["family"] not in FAMILY_NAMES:
        raise EngineError(f"{path}: the engine dir is of model family '{data['family']}', which this sdfast does not run "
                          f"({', '.join(FAMILY_NAMES)})")
    try:
        _check_structure(data, root)
        components = {name: ComponentInfo.from_json(name, info, data["dynamic_dims"]) for name, info in data["components"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise EngineError(f"{path}: manifest is incomplete or malformed ({type(error).__name__}: {error})") from None
    return Manifest(root=root, data=data, components=components)


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


def _check_structure(data: dict, root: Path) -> None:
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
        for tensor in list(info.get("inputs", [])) + list(info.get("outputs", [])):
            shape_ok = all(
                (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and d in data["dynamic_dims"])
                for d in tensor.get("shape", [None])
            )
            if tensor.get("dtype") not in _TENSOR_DTYPES or not shape_ok:
                raise ValueError(
                    f"component '{name}': tensor '{tensor.get('name')}' needs a shape of positive sizes or declared dynamic dims, "
                    f"and a dtype of {_TENSOR_DTYPES}"
                )
    _check_sizes(data, root)
    denoisers = [name for name, info in data["components"].items() if info.get("role") == "denoiser"]
    if len(denoisers) != 1:
        raise ValueError(f"there must be exactly one component with role 'denoiser', not {len(denoisers)}")


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
            for backend, variant in entry.get("variants", {}).items():
                _check_graph_files(f"component '{name}' at {key}, variant '{backend}'", variant, root)
        shared = info.get("shared_weights")
        if shared is not None:
            if not isinstance(shared, dict) or not all(isinstance(shared.get(k), str) for k in ("file", "index")):
                raise ValueError(f"component '{name}': 'shared_weights' needs 'file', 'index' and 'files'")
            _check_files(shared.get("files"), root)
            if shared["index"] not in shared["files"]:
                raise ValueError(f"component '{name}': its shared-weights index is not among its hashed files")


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
