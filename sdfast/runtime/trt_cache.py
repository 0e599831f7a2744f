"""TensorRT engine cache: which serialized engine fits this GPU, TensorRT and ONNX graph, kept in tensorrt/cache.json.

A TensorRT plan only runs on the GPU model, compute capability and TensorRT version that built it, and only stands
for the ONNX graph it was built from. So the key is those four plus the build settings (shape profile, precision),
hashed; the ONNX graph counts by its sha256, never by its file name. Entries live in the engine dir's own cache file,
never in manifest.json (that stays what the export wrote, and what --verify checks), each with its plan file's sha256;
an entry whose key or plan no longer matches is stale and is rebuilt. Writers hold an exclusive flock on
tensorrt/cache.lock and replace the file atomically, so processes that build at once lose no entry. Every path goes
through manifest.confined. Pure Python: the key, staleness and locking run (and are tested) without TensorRT or a GPU.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sdfast.errors import EngineError
from sdfast.runtime.files import shared_mode
from sdfast.runtime.manifest import ComponentInfo, confined, sha256_file

PLAN_DIR = "tensorrt"
CACHE_FILE = f"{PLAN_DIR}/cache.json"
LOCK_FILE = f"{PLAN_DIR}/cache.lock"
TIMING_CACHE = f"{PLAN_DIR}/timing.cache"
CACHE_FORMAT = "sdfast-tensorrt-cache"


@dataclass(frozen=True)
class EngineKey:
    component: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    onnx_sha256: str  # of the graph file the plan was built from (external weights are covered by the manifest's own hash check)
    profile: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]  # (input, min, opt, max)
    precision: str  # "fp16": strongly typed from the fp16 graph; "fp32"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        data = asdict(self)
        data["profile"] = [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.profile]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "EngineKey":
        profile = tuple((name, tuple(lo), tuple(opt), tuple(hi)) for name, lo, opt, hi in data["profile"])
        return cls(**{**{k: data[k] for k in cls.__dataclass_fields__ if k != "profile"}, "profile": profile})

    def plan_name(self) -> str:
        return f"{PLAN_DIR}/{self.component}-{self.digest()[:16]}.plan"


def shape_profile(info: ComponentInfo) -> tuple:
    """(input, min, opt, max) per input: static axes fixed, the prompt-length axis from one chunk to the engine's maximum."""
    rows = []
    for spec in info.inputs:
        low = tuple(d if isinstance(d, int) else info.dynamic[d].min for d in spec.shape)
        high = tuple(d if isinstance(d, int) else info.dynamic[d].max for d in spec.shape)
        rows.append((spec.name, low, low, high))
    return tuple(rows)


def key_for(info: ComponentInfo, gpu_name: str, compute_capability: str, tensorrt_version: str) -> EngineKey:
    """The key of ``info``'s portable graph on this GPU and TensorRT: by the graph's sha256, not its file name."""
    return EngineKey(info.name, gpu_name, compute_capability, tensorrt_version, info.files[info.file]["sha256"],
                     shape_profile(info), info.precision)


def read_entries(engine_dir: Path) -> list[dict]:
    """The cache's entries, each checked (its plan named by its key, inside the engine dir); [] before the first build."""
    path = confined(engine_dir, CACHE_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EngineError(f"{path}: unreadable ({error}); delete it to rebuild the TensorRT engines") from None
    try:
        if data.get("format") != CACHE_FORMAT:
            raise ValueError("not an sdfast TensorRT engine cache")
        entries = list(data["engines"])
        for entry in entries:
            _check_entry(entry)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise EngineError(f"{path}: malformed ({type(error).__name__}: {error}); delete it to rebuild the TensorRT engines") from None
    for entry in entries:
        confined(engine_dir, entry["file"])
    return entries


def _check_entry(entry: dict) -> None:
    """An entry's fields, and its plan file: the one its key names (so no entry can point at another file of the dir)."""
    key = EngineKey.from_json(entry["key"])
    if not all(isinstance(getattr(key, name), str) for name in ("component", "gpu_name", "compute_capability", "tensorrt_version")):
        raise ValueError("an entry's key names its component, GPU and TensorRT version as strings")
    if entry["digest"] != key.digest() or entry["file"] != key.plan_name():
        raise ValueError(f"entry '{entry['file']}' does not match its key")
    if not isinstance(entry["bytes"], int) or not isinstance(entry["sha256"], str):
        raise ValueError(f"entry '{entry['file']}' needs 'bytes' and 'sha256'")


def lookup(engine_dir: Path, key: EngineKey, verify: str = "size") -> Path | None:
    """The plan for ``key`` when its entry matches and its file is intact ('size' or 'full' sha256), else None (stale)."""
    digest = key.digest()
    for entry in read_entries(engine_dir):
        if entry["digest"] != digest or EngineKey.from_json(entry["key"]) != key:
            continue
        plan = confined(engine_dir, entry["file"])
        if not plan.is_file() or plan.stat().st_size != entry["bytes"]:
            return None
        if verify == "full" and sha256_file(plan) != entry["sha256"]:
            return None
        return plan
    return None


def stale(entries: list[dict], key: EngineKey) -> list[dict]:
    """Entries of the same component, at the same image size, on the same GPU model that ``key`` replaces (another
    TensorRT, graph or prompt-length range). Another size's plan (an engine dir with several sizes) is kept."""
    size = _static_shapes(key.to_json()["profile"])
    return [e for e in entries if e["key"]["component"] == key.component and e["key"]["gpu_name"] == key.gpu_name
            and e["key"]["compute_capability"] == key.compute_capability and e["digest"] != key.digest()
            and _static_shapes(e["key"]["profile"]) == size]


def _static_shapes(profile: list) -> list:
    """The profile's inputs with their smallest shapes: what differs between the sizes of one component."""
    return [[name, list(low)] for name, low, *_ in profile]


def record(engine_dir: Path, key: EngineKey, plan_bytes: bytes, build_seconds: float) -> Path:
    """Write the plan and its cache entry (replacing stale ones and their plans) under the cache's lock; returns the plan."""
    plan = confined(engine_dir, key.plan_name())
    with _locked(engine_dir):
        entries = read_entries(engine_dir)
        replaced = stale(entries, key)
        kept = [e for e in entries if e not in replaced and e["digest"] != key.digest()]
        _atomic_write(plan, plan_bytes)
        kept.append({
            "digest": key.digest(), "key": key.to_json(), "file": key.plan_name(), "bytes": len(plan_bytes),
            "sha256": hashlib.sha256(plan_bytes).hexdigest(), "build_seconds": round(build_seconds, 1),
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        cache = {"format": CACHE_FORMAT, "engines": kept}
        _atomic_write(confined(engine_dir, CACHE_FILE), (json.dumps(cache, indent=2) + "\n").encode())
        for entry in replaced:
            if entry["file"] not in {e["file"] for e in kept}:
                confined(engine_dir, entry["file"]).unlink(missing_ok=True)
    return plan


def timing_cache_path(engine_dir: Path) -> Path:
    """Where TensorRT's timing cache is kept between builds (inside the engine dir)."""
    return confined(engine_dir, TIMING_CACHE)


@contextlib.contextmanager
def _locked(engine_dir: Path):
    """An exclusive flock on tensorrt/cache.lock for the block: one writer of the cache at a time, across processes."""
    plans = confined(engine_dir, PLAN_DIR)
    lock = confined(engine_dir, LOCK_FILE)
    try:
        plans.mkdir(exist_ok=True)
        handle = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # flock needs no write access
    except OSError as error:
        raise EngineError(f"cannot lock the TensorRT engine cache {lock}: {error.strerror or error}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def writable(engine_dir: Path) -> None:
    plans = confined(engine_dir, PLAN_DIR)
    if not os.access(plans if plans.is_dir() else engine_dir, os.W_OK):
        raise EngineError(f"engine dir {engine_dir} is read-only: the tensorrt backend stores the engines it builds there")


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, shared_mode())  # as the umask allows, like the export's files
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
