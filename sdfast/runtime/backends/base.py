"""The backend interface: an Engine runs one component, a Backend loads components into engines."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.manifest import ComponentInfo

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class Engine(ABC):
    """One exported component, ready to run at its fixed shapes."""

    def __init__(self, info: ComponentInfo):
        self.info = info

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs in the manifest's order, dtype and shape; a mismatch is a bug in the caller, said plainly."""
        checked = {}
        for spec in self.info.inputs:
            value = feeds.get(spec.name)
            if value is None:
                raise EngineError(f"{self.info.name}: input '{spec.name}' not given")
            if not self._shape_fits(tuple(value.shape), spec.shape):
                raise EngineError(f"{self.info.name}: input '{spec.name}' has shape {tuple(value.shape)}, the engine was built for {self.describe(spec.shape)}")
            checked[spec.name] = np.ascontiguousarray(value, dtype=_NUMPY_DTYPES[spec.dtype])
        return checked

    def _shape_fits(self, shape: tuple[int, ...], declared: tuple[int | str, ...]) -> bool:
        return len(shape) == len(declared) and all(
            self.info.dynamic[d].accepts(n) if isinstance(d, str) else n == d for n, d in zip(shape, declared)
        )

    def describe(self, declared: tuple[int | str, ...]) -> tuple:
        """A declared shape for messages: a dynamic axis reads as 'name=min..max step k'."""
        return tuple(
            f"{d}={self.info.dynamic[d].min}..{self.info.dynamic[d].max} step {self.info.dynamic[d].multiple_of}" if isinstance(d, str) else d
            for d in declared
        )

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the manifest's order."""


class Backend(ABC):
    name: str
    can_override_initializers: bool = False  # whether ``load`` takes merged weights (LoRAs at run time)

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(usable here, why not)."""

    @abstractmethod
    def load(self, info: ComponentInfo, path: Path, overrides: dict[str, np.ndarray] | None = None) -> Engine:
        """The component's engine; ``overrides``: initializer name -> array that replaces the stored one (a LoRA merged in)."""

    def cannot_override(self, info: ComponentInfo) -> str | None:
        """Why ``load`` cannot take merged weights (LoRAs at run time) for ``info``, or None."""
        return None if self.can_override_initializers else f"backend '{self.name}' cannot replace an engine's weights at load"

    def cannot_run(self, info: ComponentInfo) -> str | None:
        """Why this backend cannot run ``info`` as exported (its precision, its ops), or None: asked of every component
        before anything is hashed, built or loaded."""
        return None

    def graph_for(self, info: ComponentInfo) -> tuple[str, dict[str, dict]]:
        """(the graph file this backend loads for ``info``, every file that graph reads with its manifest entry)."""
        return info.file, info.files

    def files_for(self, info: ComponentInfo) -> dict[str, dict]:
        """The files ``load`` reads for ``info``: what a load verifies, and nothing else."""
        files = dict(self.graph_for(info)[1])
        if info.shared_weights:  # the index the shared weights are mapped by (the data file is among the graph's)
            files.update(info.shared_weights["files"])
        return files
