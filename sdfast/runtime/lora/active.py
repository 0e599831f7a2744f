"""The LoRAs a pipeline's engines carry, and the switch to another set: merged weights, then new sessions."""
from __future__ import annotations

import gc
import time

from sdfast.errors import EngineError, RequestError
from sdfast.runtime.lora.library import LoraFile, LoraLibrary
from sdfast.runtime.lora.patcher import initializer_overrides, merged_deltas, read_parameter_map
from sdfast.runtime.lora.prompt_tags import LoraUse, extract_loras

PATCHED_ROLES = ("denoiser", "text_encoder")


class PipelineLoras:
    """Which LoRAs (with multipliers) the pipeline's U-Net and text encoders hold, and ``apply`` to change them.

    A switch re-creates only the sessions whose weights change, each with its merged initializers as overrides
    (onnxruntime's SessionOptions.add_initializer); the engine dir on disk is never written. The previous set's
    sessions are dropped before the new ones are built, so memory holds one copy of each component.
    """

    def __init__(self, pipeline, backend=None, library: LoraLibrary | None = None):
        self.pipeline, self.backend = pipeline, backend
        self.library = library or LoraLibrary(None)
        self.applied: tuple = ()  # ((name, short hash, te weight, unet weight), ...) of the LoRAs the engines hold
        self.files: list[LoraFile] = []  # their files, in that order (the infotext's hashes)
        self.patched: set[str] = set()  # components whose sessions carry overrides
        self.switch_s: float | None = None  # the last switch's seconds (merging and sessions)
        self._maps: dict[str, dict] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def uses(self, prompt: str, extra: tuple = ()) -> tuple[str, list[LoraUse]]:
        """(the prompt without its <lora:...> tags, the LoRAs of its tags then ``extra``), each name checked to exist."""
        text, tagged = extract_loras(prompt)
        uses = [*tagged, *extra]
        for use in uses:
            self.library.path(use.name)
        return text, uses

    def check(self, uses: list[LoraUse]) -> None:
        """Read and check each LoRA against this engine (read once per file version), so a bad one is refused up front."""
        if uses:
            if self.backend is not None and not self.backend.can_override_initializers:
                raise RequestError(f"LoRAs at run time need a backend that can override weights; '{self.backend.name}' cannot "
                                   "(export with --lora instead)")
            for use in uses:
                self.library.read(use.name, self.shapes())

    def _components(self) -> list[str]:
        engines = self.pipeline.engines
        return [name for name, info in self.pipeline.manifest.components.items() if info.role in PATCHED_ROLES and name in engines]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight a LoRA may change in this engine dir, with its shape (read from the parameter maps once)."""
        if self._shapes is None:
            self._maps = {name: read_parameter_map(self.pipeline.manifest, name) for name in self._components()}
            self._shapes = {target: shape for data in self._maps.values() for target, shape in data["parameters"].items()}
        return self._shapes

    def apply(self, uses: list[LoraUse], progress=None) -> None:
        """Make the engines hold exactly ``uses``; nothing changes when they already do. A RequestError (unknown, corrupt
        or mismatched LoRA) leaves the engines as they were."""
        if not uses and not self.patched:
            self.applied, self.files = (), []
            return
        self.check(uses)
        shapes = self.shapes() if uses else {}
        files = [self.library.read(use.name, shapes) for use in uses]
        key = tuple((f.name, f.short_hash, u.te_weight, u.unet_weight) for f, u in zip(files, uses))
        if key == self.applied:
            return
        started = time.perf_counter()
        manifest, backend = self.pipeline.manifest, self.backend
        names = ", ".join(f"'{u.name}'" for u in uses)
        overrides = {}
        for component in self._components():  # every merge first: a refused LoRA leaves the engines untouched
            deltas = merged_deltas(component, [(f, u.weight_for(component)) for f, u in zip(files, uses)], shapes)
            if deltas:
                info = manifest.components[component]
                graph = backend.graph_for(info)[0]
                graph_map = self._maps[component]["graphs"].get(graph)
                if graph_map is None:
                    raise RequestError(f"LoRA {names}: this engine's {graph} has no parameter map (backend '{backend.name}')")
                overrides[component] = initializer_overrides(manifest.root, graph, graph_map, deltas, names)
        changed = sorted(set(overrides) | self.patched)
        try:
            for component in changed:
                self._rebuild(component, overrides.get(component), progress)
        except EngineError:  # back to the stored weights everywhere: never a half-patched engine
            for component in changed:
                self._rebuild(component, None, None)
            self.patched, self.applied, self.files = set(), (), []
            self.pipeline.family = type(self.pipeline.family)(manifest, self.pipeline.engines)
            raise
        self.patched = set(overrides)
        self.applied, self.files = key, files
        self.pipeline.family = type(self.pipeline.family)(manifest, self.pipeline.engines)  # encoders cached by the family
        self.switch_s = time.perf_counter() - started

    def _rebuild(self, component: str, overrides: dict | None, progress) -> None:
        """Drop ``component``'s session, then load it with ``overrides`` (None: the stored weights)."""
        engines, info = self.pipeline.engines, self.pipeline.manifest.components[component]
        if progress:
            progress(f"LoRA: rebuilding the {component} session")
        engines.pop(component, None)
        gc.collect()
        engines[component] = self.backend.load(info, self.pipeline.manifest.path(info.file), overrides=overrides)

    def infotext_hashes(self) -> str | None:
        """A1111's "Lora hashes" value: name: short hash, for each LoRA the engines hold."""
        return ", ".join(f"{f.name}: {f.short_hash}" for f in self.files) or None
