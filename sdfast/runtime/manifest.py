"""manifest.json: what an engine dir holds, read and checked before anything is loaded."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sdfast.errors import EngineError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "sdfast-engine"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
_HASH_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        return cls(name=data["name"], shape=tuple(int(d) for d in data["shape"]), dtype=data["dtype"])


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    file: str
    files: dict[str, dict]  # every file of the component (graph and external data): {"sha256", "bytes"}
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str

    @classmethod
    def from_json(cls, name: str, data: dict) -> "ComponentInfo":
        return cls(
            name=name,
            file=data["file"],
            files=data["files"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            precision=data["precision"],
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
    def model(self) -> dict:
        return self.data["model"]

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    @property
    def model_hash(self) -> str:
        """A1111's short model hash: the first 10 hex digits of the weights' fingerprint."""
        return self.data["source"]["fingerprint"].split(":")[-1][:10]

    @property
    def model_name(self) -> str:
        return self.data["source"]["name"]

    def path(self, relative: str) -> Path:
        return self.root / relative

    def verify_files(self, full: bool = True) -> None:
        """Every listed file is present with its size, and (``full``) its sha256."""
        for component in self.components.values():
            for relative, expected in component.files.items():
                path = self.path(relative)
                if not path.is_file():
                    raise EngineError(f"engine dir {self.root}: {component.name} file '{relative}' is missing")
                size = path.stat().st_size
                if size != expected["bytes"]:
                    raise EngineError(
                        f"engine dir {self.root}: '{relative}' is {size} bytes, the manifest says {expected['bytes']} (corrupt or replaced)"
                    )
                if full and sha256_file(path) != expected["sha256"]:
                    raise EngineError(f"engine dir {self.root}: '{relative}' does not match its sha256 in the manifest (corrupt or replaced)")
        for key in ("file",):
            for section in (self.data["tokenizer"], self.data["scheduler"]):
                if not self.path(section[key]).is_file():
                    raise EngineError(f"engine dir {self.root}: '{section[key]}' is missing")


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
    if version != FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format version {version}, this sdfast reads version {FORMAT_VERSION}; re-export the model"
        )
    try:
        components = {name: ComponentInfo.from_json(name, info) for name, info in data["components"].items()}
        for key in ("geometry", "model", "tokenizer", "scheduler", "source"):
            data[key]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as error:
        raise EngineError(f"{path}: manifest is incomplete or malformed ({error})") from None
    return Manifest(root=root, data=data, components=components)
