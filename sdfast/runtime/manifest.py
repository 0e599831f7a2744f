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
ROLES = ("text_encoder", "denoiser", "denoiser_cond", "denoiser_shallow", "denoiser_int8", "denoiser_shallow_int8", "vae_decoder", "vae_decoder_tiny", "vae_decoder_tile", "vae_encoder", "vae_encoder_tile", "controlnet")  # what a component does; a family may have several text encoders
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
                     progress: Callable[[int, int], None] | None = None, remembered: bool = True) -> None:
        """Every file of ``files`` (default: all listed) is present with its size, and (``full``) its sha256.

        ``progress(bytes_done, bytes_total)`` is called as the files are hashed. ``remembered``: a file hashed before and
        unchanged since (runtime.verified_cache) is not hashed again; False hashes every file.
        """
        from sdfast.runtime.verified_cache import VerifiedFiles

        files = self.listed_files() if files is None else files
        total, done = sum(entry["bytes"] for entry in files.values()), 0
        verified = VerifiedFiles() if full and remembered else None
        try:
            for relative, expected in files.items():
                done = self._verify_file(relative, expected, full, verified, progress, done, total)
        finally:
            if verified is not None:
                verified.save()

    def _verify_file(self, relative: str, expected: dict, full: bool, verified, progress, done: int, total: int) -> int:
        """One file of verify_files; returns the bytes done after it."""
        path = self.path(relative)
        if not path.is_file():
            raise EngineError(f"engine dir {self.root}: file '{relative}' is missing")
        try:
            stat = path.stat()
            if stat.st_size != expected["bytes"]:
                raise EngineError(
                    f"engine dir {self.root}: '{relative}' is {stat.st_size} bytes, the manifest says {expected['bytes']} (corrupt or replaced)"
                )
            if full and (verified is None or verified.known(path, stat) != expected["sha256"]):
                on_chunk = (lambda n, base=done: progress(base + n, total)) if progress else None
                digest = sha256_file(path, on_chunk)
                if digest != expected["sha256"]:
                    raise EngineError(f"engine dir {self.root}: '{relative}' does not match its sha256 in the manifest (corrupt or replaced)")
                if verified is not None:
                    verified.remember(path, stat, digest)
        except OSError as error:
            raise EngineError(f"engine dir {self.root}: cannot read '{relative}': {error.strerror or error}") from None
        done += stat.st_size
        if progress:
            progress(done, total)
        return done


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
        from sdfast.runtime.manifest_checks import check_structure

        check_structure(data, root)
        components = {name: ComponentInfo.from_json(name, info, data["dynamic_dims"]) for name, info in data["components"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise EngineError(f"{path}: manifest is incomplete or malformed ({type(error).__name__}: {error})") from None
    return Manifest(root=root, data=data, components=components)
