"""Engine dirs that bench exports on demand, cached under $SDFAST_CACHE/bench-engines and re-exported when stale."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from sdfast.errors import ConfigError


def cached_engine(model: str, height: int | None, width: int | None, batch: int, guidance: bool,
                  log: Callable[[str], None], progress: Callable[[str], None], precision: str = "fp32") -> Path:
    """An engine dir of ``model`` at this geometry: the cached one if it is current, else a fresh export."""
    from sdfast.export.build import ExportRequest, check_request, export_engine
    from sdfast.export.built_once import folder_lock
    from sdfast.export.builtin import BUILTIN_MODELS, cache_root

    builtin = model in BUILTIN_MODELS
    if not builtin and not Path(model).is_dir():
        raise ConfigError(f"--model '{model}' is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a folder")
    label = model if builtin else "folder-" + hashlib.sha1(str(Path(model).resolve()).encode()).hexdigest()[:12]
    out = cache_root() / "bench-engines" / f"{label}-{width or 'native'}x{height or 'native'}-b{batch}-{'cfg' if guidance else 'nocfg'}{'' if precision == 'fp32' else '-' + precision}"
    with folder_lock(out):  # two benches (or parallel tests) asking at once: one exports, the other waits
        if _is_fresh(out, model, builtin, precision):
            log(f"using the cached engine {out}")
            return out
        request = ExportRequest(model=model, out=out, height=height, width=width, batch=batch, guidance=guidance, force=True,
                                precision=precision)
        check_request(request)
        log(f"exporting {model} ({'with' if guidance else 'without'} guidance) to {out}")
        export_engine(request, progress)
    return out


def _is_fresh(out: Path, model: str, builtin: bool, precision: str) -> bool:
    """The cached engine dir was exported by this sdfast and format, from these weights, with a usable CPU variant."""
    from sdfast import __version__
    from sdfast.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME

    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        denoiser = next(c for c in manifest["components"].values() if c.get("role") == "denoiser")  # the U-Net, SD3's transformer
        fresh = (manifest["format_version"] == FORMAT_VERSION and manifest["libraries"]["sdfast"] == __version__
                 and "flops" in denoiser and manifest["source"]["builtin"] == builtin
                 and manifest["precision"] == precision and (precision != "fp32" or _variant_current(denoiser)))
        if fresh and not builtin:
            from sdfast.export.source import weights_fingerprint

            fresh = manifest["source"]["fingerprint"] == weights_fingerprint(Path(model))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        fresh = False
    return fresh


def _variant_current(unet: dict) -> bool:
    """The CPU variant was made by this onnxruntime on this ISA, so the cpu backend will use it."""
    import onnxruntime

    from sdfast.runtime.backends import cpu_isa

    made_for = unet.get("variants", {}).get("cpu", {}).get("optimization", {})
    return made_for.get("onnxruntime") == onnxruntime.__version__ and made_for.get("isa") == cpu_isa()
