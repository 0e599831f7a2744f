"""The LoRAs a pipeline's engines carry, and the switch to another set: merged weights, then new sessions."""
from __future__ import annotations

import gc
import time
import weakref

from sdfast.errors import RequestError
from sdfast.runtime.lora.library import LoraFile, LoraLibrary
from sdfast.runtime.lora.patcher import initializer_overrides, read_parameter_map, updates_for
from sdfast.runtime.lora.prompt_tags import LoraUse, extract_loras

PATCHED_ROLES = ("denoiser", "text_encoder")


class PipelineLoras:
    """Which LoRAs (with multipliers) the pipeline's U-Net and text encoders hold, and ``apply`` to change them.

    A switch re-creates only the sessions whose weights change, each with its merged initializers standing in for
    the stored ones (onnxruntime's add_external_initializers); the engine dir on disk is never written. Each old
    session is dropped before its successor's weights are merged, so memory holds one copy of each component.
    """

    def __init__(self, pipeline, backend=None, library: LoraLibrary | None = None):
        self._pipeline, self.backend = weakref.ref(pipeline), backend  # weak: the pipeline owns this, not the reverse
        self.library = library or LoraLibrary(None)
        self.applied: tuple = ()  # ((name, short hash, te weight, unet weight), ...) of the LoRAs the engines hold
        self.files: list[LoraFile] = []  # their files, in that order (the infotext's hashes)
        self.patched: set[str] = set()  # components whose sessions carry overrides
        self.switch_s: float | None = None  # the last switch's seconds (merging and sessions)
        self.progress = None  # progress(message) as a switch merges and rebuilds each component (SDXL's takes a while)
        self._maps: dict[str, dict] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def pipeline(self):
        return self._pipeline()

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
            for name in self._components() if self.backend is not None else ():
                refused = self.backend.cannot_override(self.pipeline.manifest.components[name])
                if refused:
                    raise RequestError(f"LoRAs at run time: {refused} (use an fp32 engine, or fuse the LoRA at export: --lora)")
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
        progress = progress or self.progress
        manifest, backend = self.pipeline.manifest, self.backend
        names = ", ".join(f"'{u.name}'" for u in uses)
        plans = {}  # component -> (graph, its map, the updates): every check before any session is touched
        for component in self._components():
            updates = updates_for(component, [(f, u.weight_for(component)) for f, u in zip(files, uses)])
            if updates:
                refused = backend.cannot_override(manifest.components[component])
                if refused:
                    raise RequestError(f"LoRA {names}: {refused} (use an fp32 engine, or fuse the LoRA at export: --lora)")
                graph = backend.graph_for(manifest.components[component])[0]
                graph_map = self._maps[component]["graphs"].get(graph)
                if graph_map is None:
                    raise RequestError(f"LoRA {names}: this engine's {graph} has no parameter map (backend '{backend.name}')")
                unplaced = next((target for target in updates if target not in graph_map), None)
                if unplaced is not None:
                    raise RequestError(f"LoRA {names} changes {unplaced}, which this engine's {graph} holds in a form sdfast "
                                       "cannot patch (a fused or re-laid weight the export could not place)")
                plans[component] = (graph, graph_map, updates)
        changed = sorted(set(plans) | self.patched)
        try:  # one component at a time: its old session (and merged weights) go before the new ones are made
            for component in changed:
                self._drop(component, progress)
                overrides = initializer_overrides(manifest.root, *plans[component], shapes, names) if component in plans else None
                self._load(component, overrides)
                del overrides
        except Exception:  # noqa: BLE001 - whatever failed (a file, memory), back to the stored weights everywhere: never half-patched
            for component in changed:
                self._drop(component, None)
                self._load(component, None)
            self.patched, self.applied, self.files = set(), (), []
            self.pipeline.family = type(self.pipeline.family)(manifest, self.pipeline.engines)
            raise
        self.patched = set(plans)
        self.applied, self.files = key, files
        self.pipeline.family = type(self.pipeline.family)(manifest, self.pipeline.engines)  # encoders cached by the family
        self.switch_s = time.perf_counter() - started

    def _load(self, component: str, overrides: dict | None) -> None:
        info = self.pipeline.manifest.components[component]
        self.pipeline.engines[component] = self.backend.load(info, self.pipeline.manifest.path(info.file), overrides=overrides)

    def _drop(self, component: str, progress) -> None:
        """Let ``component``'s session and its merged weights go (its memory back before the next is made)."""
        if progress:
            progress(f"LoRA: merging and rebuilding {component}")
        self.pipeline.engines.pop(component, None)
        gc.collect()  # its memory stays with the process's allocator, which the merge and the new session reuse

    def infotext_hashes(self) -> str | None:
        """A1111's "Lora hashes" value: name: short hash, for each LoRA the engines hold."""
        return ", ".join(f"{f.name}: {f.short_hash}" for f in self.files) or None
