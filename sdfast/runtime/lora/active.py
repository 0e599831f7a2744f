"""The LoRAs a pipeline's engines carry, and the switch to another set: merged weights, then new sessions."""
from __future__ import annotations

import gc
import time
import weakref

from sdfast.errors import EngineError, RequestError
from sdfast.runtime.lora.library import LoraFile, LoraLibrary
from sdfast.runtime.lora.patcher import initializer_overrides, read_parameter_map, updates_for
from sdfast.runtime.lora.prompt_tags import LoraUse, extract_loras
from sdfast.runtime.lora.weight_layouts import known_layout

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
        self.component_keys: dict[str, tuple] = {}  # per component, the LoRAs (file versions, multipliers) its session holds
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

    def for_request(self, request) -> tuple[str, list[LoraUse]]:
        """(the request's prompt without its <lora:...> tags, its LoRAs), each file read and checked against the engine."""
        prompt, uses = self.uses(request.prompt, request.loras)
        self.check(uses)
        if uses and request.refiner_switch is not None:
            raise RequestError("LoRAs with a refiner are not supported yet: run the base alone, or export the LoRA into both (--lora)")
        return prompt, uses

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
        return [name for name in self._components_in_manifest() if name in self.pipeline.engines]

    def _components_in_manifest(self) -> list[str]:
        """The components LoRAs patch that the pipeline loaded (its family's), whether or not their session is there now."""
        loaded = self.pipeline.loaded_components
        return [name for name, info in self.pipeline.manifest.components.items() if info.role in PATCHED_ROLES and name in loaded]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight a LoRA may change in this engine dir, with its shape (read from the parameter maps once).

        Components without a map (an int8 text encoder) are left out: a LoRA that touches them is refused by name."""
        if self._shapes is None:
            manifest = self.pipeline.manifest
            mapped = [name for name in self._components() if manifest.components[name].parameter_map]
            if not mapped:
                raise RequestError(f"engine dir {manifest.root} has no LoRA parameter maps (exported before sdfast applied "
                                   "LoRAs at run time): re-export it, or fuse the LoRA at export (--lora)")
            self._maps = {name: read_parameter_map(manifest, name) for name in mapped}
            self._shapes = {target: shape for data in self._maps.values() for target, shape in data["parameters"].items()}
        return self._shapes

    def apply(self, uses: list[LoraUse], progress=None) -> None:
        """Make the engines hold exactly ``uses``. Only components whose LoRAs or multipliers change are rebuilt. A
        RequestError (unknown, corrupt or mismatched LoRA) leaves the engines as they were; a failure while rebuilding
        puts the stored weights back everywhere (an EngineError if even that fails)."""
        if not uses and not self.patched:
            self.applied, self.files = (), []
            return
        self.check(uses)
        shapes = self.shapes() if uses else {}
        files = [self.library.read(use.name, shapes) for use in uses]
        manifest, backend = self.pipeline.manifest, self.backend
        keys = {component: tuple((f.version, f.short_hash, u.weight_for(component)) for f, u in zip(files, uses)
                                 if u.weight_for(component) != 0 and any(t.split(".", 1)[0] == component for t in f.updates))
                for component in self._components()}
        changed = [component for component, key in keys.items() if key != self.component_keys.get(component, ())]
        names = ", ".join(f"'{u.name}'" for u in uses)
        plans = {}  # component -> (graph, its map, the updates): every check before any session is touched
        for component in changed:
            updates = updates_for(component, [(f, u.weight_for(component)) for f, u in zip(files, uses)])
            if updates:
                plans[component] = self._plan(component, updates, names)
        started = time.perf_counter()
        progress = progress or self.progress
        family_type = type(self.pipeline.family)
        self.pipeline.family = None  # its prompt encoders hold the text-encoder sessions: they must go with them
        try:  # one component at a time: its old session goes before its successor's weights are merged
            for component in changed:
                self._drop(component, progress)
                overrides = initializer_overrides(manifest.root, *plans[component], shapes) if component in plans else None
                self._load(component, overrides)
                del overrides
        except Exception:  # noqa: BLE001 - whatever failed (a file, memory), back to the stored weights everywhere
            self._restore_stored()
            raise
        finally:
            if all(name in self.pipeline.engines for name in self._components()):
                self.pipeline.family = family_type(manifest, self.pipeline.engines)
        self.patched = {component for component, key in keys.items() if key}
        self.component_keys = keys
        self.applied, self.files = tuple((f.name, f.short_hash, u.te_weight, u.unet_weight) for f, u in zip(files, uses)), files
        self.switch_s = time.perf_counter() - started

    def _plan(self, component: str, updates: dict, names: str) -> tuple:
        """(graph, its map, updates) for ``component``; a RequestError when a weight has no place there."""
        backend, info = self.backend, self.pipeline.manifest.components[component]
        refused = backend.cannot_override(info)
        if refused:
            raise RequestError(f"LoRA {names}: {refused} (fuse the LoRA at export instead: --lora)")
        graph = backend.graph_for(info)[0]
        graph_map = self._maps[component]["graphs"].get(graph)
        if graph_map is None:
            raise RequestError(f"LoRA {names}: this engine's {graph} has no parameter map (backend '{backend.name}')")
        for target in updates:
            place = graph_map.get(target)
            if place is None:
                raise RequestError(f"LoRA {names} changes {target}, which this engine's {graph} holds in a form sdfast "
                                   "cannot patch (a fused or re-laid weight the export could not place)")
            if not known_layout(place.get("layout")):
                raise RequestError(f"LoRA {names}: {graph} holds {target} in layout '{place.get('layout')}', unknown to this "
                                   "sdfast (exported by a newer one?)")
        return graph, graph_map, updates

    def _restore_stored(self) -> None:
        """Every patchable component back on its stored weights, the state said so; an EngineError if that fails too."""
        self.patched, self.component_keys, self.applied, self.files = set(), {}, (), []
        try:
            for component in self._components_in_manifest():
                self._drop(component, None)
                self._load(component, None)
        except Exception as error:  # noqa: BLE001
            raise EngineError(f"a LoRA switch failed and the stored weights could not be loaded again ({error}): "
                              "restart the process") from None

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
