"""TensorRT engine cache: which serialized engine fits this GPU, TensorRT and ONNX graph, recorded in the manifest.

A TensorRT plan only runs on the GPU model, compute capability and TensorRT version that built it, and only stands
for the ONNX graph it was built from. So the key is those four plus the build settings (shape profile, precision),
hashed; the ONNX graph counts by its sha256, never by its file name. Entries live in manifest.json under
"tensorrt_engines", each with its plan file's sha256; an entry whose key or plan no longer matches is stale and is
rebuilt. Pure Python: the key and staleness checks run (and are tested) without TensorRT or a GPU.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sdfast.errors import EngineError
from sdfast.runtime.manifest import MANIFEST_NAME, ComponentInfo, sha256_file

SECTION = "tensorrt_engines"
PLAN_DIR = "tensorrt"


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


def entries(manifest_data: dict) -> list[dict]:
    return list(manifest_data.get(SECTION, []))


def lookup(engine_dir: Path, manifest_data: dict, key: EngineKey, verify: str = "size") -> Path | None:
    """The plan for ``key`` when its entry matches and its file is intact ('size' or 'full' sha256), else None (stale)."""
    digest = key.digest()
    for entry in entries(manifest_data):
        if entry.get("digest") != digest or EngineKey.from_json(entry["key"]) != key:
            continue
        plan = engine_dir / entry["file"]
        if not plan.is_file() or plan.stat().st_size != entry["bytes"]:
            return None
        if verify == "full" and sha256_file(plan) != entry["sha256"]:
            return None
        return plan
    return None


def stale(manifest_data: dict, key: EngineKey) -> list[dict]:
    """Entries of the same component on the same GPU model that ``key`` replaces (another TensorRT, graph or profile)."""
    return [e for e in entries(manifest_data) if e["key"]["component"] == key.component and e["key"]["gpu_name"] == key.gpu_name
            and e["key"]["compute_capability"] == key.compute_capability and e.get("digest") != key.digest()]


def record(engine_dir: Path, key: EngineKey, plan_bytes: bytes, build_seconds: float) -> Path:
    """Write the plan and its manifest entry (replacing stale ones), each atomically; returns the plan's path."""
    plan = engine_dir / key.plan_name()
    plan.parent.mkdir(exist_ok=True)
    _atomic_write(plan, plan_bytes)
    manifest_path = engine_dir / MANIFEST_NAME
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    replaced = stale(data, key)
    kept = [e for e in entries(data) if e not in replaced and e.get("digest") != key.digest()]
    kept.append({
        "digest": key.digest(), "key": key.to_json(), "file": key.plan_name(), "bytes": len(plan_bytes),
        "sha256": hashlib.sha256(plan_bytes).hexdigest(), "build_seconds": round(build_seconds, 1),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    data[SECTION] = kept
    _atomic_write(manifest_path, (json.dumps(data, indent=2) + "\n").encode())
    for entry in replaced:
        if entry["file"] not in {e["file"] for e in kept}:
            (engine_dir / entry["file"]).unlink(missing_ok=True)
    return plan


def writable(engine_dir: Path) -> None:
    if not os.access(engine_dir, os.W_OK):
        raise EngineError(f"engine dir {engine_dir} is read-only: the tensorrt backend stores the engines it builds there")


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
