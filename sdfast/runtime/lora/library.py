"""The LoRA directory given to ``generate`` and ``serve``: LoRAs are named, never given as a path in a request."""
from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from sdfast.errors import RequestError
from sdfast.runtime.lora.formats import LowRankUpdate, parse_lora
from sdfast.runtime.lora.safetensors_file import read_header, read_tensors

MAX_LORA_BYTES = 2 * 2**30  # LoRA and LoCon files are MBs to hundreds of MBs; a multi-GB file is a checkpoint, not a LoRA
KEPT_PARSED = 8  # parsed LoRAs kept for reuse (float32 arrays: twice an fp16 file); older ones are read again when named


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    short_hash: str  # A1111's "Lora hashes" entry: sha256 of the tensor bytes after the header, first 12 hex digits
    updates: dict[str, LowRankUpdate]
    metadata: dict[str, str]
    version: tuple = ()  # (path, mtime_ns, size): another version of the file is another LoRA


def a1111_short_hash(path: Path) -> str:
    """A1111's hash of a .safetensors LoRA (kohya's addnet hash): sha256 of everything after the JSON header, 12 hex."""
    header_length, _ = read_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(8 + header_length)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def header_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's __metadata__, read from its header alone ({} when it has none or is unreadable)."""
    try:
        metadata = read_header(path)[1].get("__metadata__") or {}
    except (OSError, RequestError, struct.error):
        return {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


class LoraLibrary:
    """The ``.safetensors`` files under one folder, each named by its file stem (A1111's models/Lora)."""

    def __init__(self, folder: Path | None):
        if folder is not None and not Path(folder).is_dir():
            raise RequestError(f"--lora-dir '{folder}' is not a directory")
        self.folder = None if folder is None else Path(folder)
        self._read: OrderedDict[tuple, LoraFile] = OrderedDict()  # the most recently used last
        self._lock = threading.Lock()  # the server checks requests on its event loop while the worker applies LoRAs

    def files(self) -> dict[str, Path]:
        """name -> path: a file at the top level first, else the first in path order, when two share a name."""
        found: dict[str, Path] = {}
        if self.folder is not None:
            for path in sorted(self.folder.rglob("*.safetensors")):
                if path.is_file():
                    found.setdefault(path.stem, path)
            found.update((path.stem, path) for path in self.folder.glob("*.safetensors") if path.is_file())
        return found

    def path(self, name: str) -> Path:
        if self.folder is None:
            raise RequestError(f"LoRA '{name}' asked for, but no LoRA directory was given (--lora-dir)")
        top_level = self.folder / f"{name}.safetensors"
        if "/" not in name and "\\" not in name and top_level.is_file():  # checked per request: no walk of the tree
            return top_level
        files = self.files()
        if name not in files:
            known = ", ".join(sorted(files)[:20]) or "none"
            raise RequestError(f"unknown LoRA '{name}' (LoRAs in {self.folder}: {known})")
        return files[name]

    def listing(self) -> list[dict]:
        """A1111's /sdapi/v1/loras entries: name, alias, path and metadata (the header's, unparsed) of each file."""
        entries = []
        for name, path in self.files().items():
            entries.append({"name": name, "alias": name, "path": str(path), "metadata": header_metadata(path)})
        return entries

    def read(self, name: str, targets: dict[str, tuple[int, ...]]) -> LoraFile:
        """The LoRA's updates for an engine with ``targets``; read once per file version while recently used."""
        path = self.path(name)
        stat = path.stat()
        version = (str(path), stat.st_mtime_ns, stat.st_size)
        key = (name, version, hash(frozenset(targets.items())))
        with self._lock:
            found = self._read.get(key)
            if found is not None:
                self._read.move_to_end(key)
                return found
        tensors, metadata = read_tensors(path, MAX_LORA_BYTES)
        found = LoraFile(name, path, a1111_short_hash(path), parse_lora(name, tensors, targets, metadata), metadata, version)
        with self._lock:
            self._read[key] = found
            while len(self._read) > KEPT_PARSED:
                self._read.popitem(last=False)
        return found
