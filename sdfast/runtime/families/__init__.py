"""Model families on the runtime side, one small module each, picked by the manifest's ``family``.

A family module says which components an engine dir of it has, turns a request into the denoiser's named
conditioning arrays (constant over the steps), and gives the latent layout. The pipeline and every backend feed
``{**conditioning, "sample": ..., "timestep": ...}`` by name and never ask which family they run.
"""
from __future__ import annotations

import importlib

from sdfast.errors import EngineError
from sdfast.runtime.families.base import Family, LatentLayout, guided_rows

# family name -> module holding its Family subclass as FAMILY; more families are more lines here
_MODULES = {"sd15": "sdfast.runtime.families.sd15", "sdxl": "sdfast.runtime.families.sdxl", "sd3": "sdfast.runtime.families.sd3"}
FAMILY_NAMES = tuple(_MODULES)


def family_class(name: str) -> type[Family]:
    """The runtime side of family ``name``, or an EngineError naming the families this sdfast runs."""
    if name not in _MODULES:
        raise EngineError(f"this engine dir is of model family '{name}', which this sdfast does not run ({', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name]).FAMILY


__all__ = ["FAMILY_NAMES", "Family", "LatentLayout", "family_class", "guided_rows"]
