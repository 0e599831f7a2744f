"""An engine dir's ControlNets: listed by its manifest, each verified and loaded on first use, run per model evaluation."""
from __future__ import annotations

import threading
import time

import numpy as np

from sdfast.errors import EngineError, RequestError
from sdfast.runtime.control import ControlUnit
from sdfast.runtime.manifest import ComponentInfo, Manifest


class ControlNets:
    """The ControlNets of one engine dir. ``residuals`` sums the active units' scaled residuals for one U-Net call."""

    def __init__(self, manifest: Manifest, backend=None, verify: str = "full"):
        self.manifest, self.backend, self.verify = manifest, backend, verify
        self.infos: dict[str, ComponentInfo] = {}
        self.records: dict[str, dict] = {}  # name -> the manifest's "controlnet" block: name, source
        for key, info in manifest.components.items():
            if info.role == "controlnet":
                record = manifest.data["components"][key]["controlnet"]
                self.infos[record["name"]], self.records[record["name"]] = info, record
        self.engines: dict = {}
        self.load_s = 0.0  # seconds spent verifying and loading ControlNets, on their first use
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self.infos)

    def model_hash(self, name: str) -> str:
        """A1111's short hash of the ControlNet's weights (8 hex digits, as its model list shows them)."""
        return self.records[name]["source"]["fingerprint"].split(":")[-1][:8]

    def check(self, units: tuple[ControlUnit, ...]) -> None:
        """RequestError for a unit naming a ControlNet this engine dir lacks."""
        for unit in units:
            if unit.model not in self.infos:
                have = f"it has {', '.join(self.names)}" if self.infos else "it has none (add one with sdfast export-controlnet)"
                raise RequestError(f"unknown ControlNet '{unit.model}': {have}")

    def load(self, names) -> None:
        """Load the named ControlNets now (verify and create their engines), adding the seconds to ``load_s``."""
        started = time.perf_counter()
        for name in names:
            self.engine(name)
        self.load_s += time.perf_counter() - started

    def engine(self, name: str):
        """The ControlNet's engine, its files verified and loaded the first time it is asked for."""
        with self._lock:
            if name not in self.engines:
                if self.backend is None:
                    raise EngineError("ControlNets need an engine backend (Pipeline.load)")
                info = self.infos[name]
                refused = self.backend.cannot_run(info)
                if refused:
                    raise EngineError(refused)
                self.manifest.verify_files(full=self.verify == "full", files=self.backend.files_for(info))
                self.engines[name] = self.backend.load(info, self.manifest.path(info.file))
            return self.engines[name]

    def residuals(self, units: tuple[ControlUnit, ...], conditioning: dict[str, np.ndarray], x_rows: np.ndarray,
                  timesteps: np.ndarray, step: int, steps: int, use_cfg: bool) -> dict[str, np.ndarray] | None:
        """The summed residuals of the units active at ``step`` of ``steps``, by U-Net input name; None when none is.

        x_rows: [unet_batch, 4, h, w], the U-Net's latent input (without an inpainting U-Net's mask channels);
        timesteps: [unet_batch]; conditioning: the U-Net's named conditioning (each ControlNet takes what it names).
        """
        total: dict[str, np.ndarray] | None = None
        rows = x_rows.shape[0]
        for unit in units:
            if not unit.active(step, steps):
                continue
            engine = self.engine(unit.model)
            feeds = {spec.name: conditioning[spec.name] for spec in engine.info.inputs if spec.name in conditioning}
            image = np.repeat(unit.image, rows, axis=0)  # image: [unet_batch, 3, H, W] in [0, 1]
            outputs = engine.run({**feeds, "sample": x_rows, "timestep": timesteps, "controlnet_cond": image})
            scales = unit.scales(len(outputs))
            conditional_only = use_cfg and unit.conditional_only()
            total = total or {}
            for spec, output, scale in zip(engine.info.outputs, outputs, scales):
                scaled = output * scale  # [unet_batch, C, h_i, w_i]
                if conditional_only:
                    scaled[: rows // 2] = 0.0  # the unconditional rows come first
                total[spec.name] = scaled if spec.name not in total else total[spec.name] + scaled
        return total
