"""Several engine dirs behind one server: each model loads on first use, and the least recently used one is unloaded
when the next load would pass the memory budget (a count of models, or the bytes of their weights)."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdfast.errors import ConfigError, EngineError, SdfastError
from sdfast.runtime.loading import loaded_components
from sdfast.runtime.manifest import Manifest, read_manifest
from sdfast.runtime.pipeline import Pipeline

GIB = 1024**3


@dataclass(eq=False)
class ModelEntry:
    """One engine dir the server may serve; its manifest is read at start, so listings never load a model."""

    name: str
    engine_dir: Path
    manifest: Manifest
    weights_bytes: int  # what the backend reads from the engine dir: a loaded model's memory (its peak RSS is 1.02-1.2x this)
    pipeline: Pipeline | None = None
    last_used: float = 0.0
    loading: asyncio.Future | None = None  # set while a load of this model runs: other requests wait for that one
    users: int = 0  # requests generating with it now (validated, queued or running): it is unloaded only at 0

    @property
    def title(self) -> str:
        """A1111's checkpoint title, "name [short hash]"."""
        return f"{self.name} [{self.manifest.model_hash}]"


def model_entries(engines: list[tuple[str | None, Path]], backend: str) -> list[ModelEntry]:
    """The engine dirs as named entries (unnamed ones by their manifest's model name), each manifest read and checked
    against the backend now, so a wrong path or an engine dir the backend cannot run fails the start in one line."""
    entries: list[ModelEntry] = []
    for name, engine_dir in engines:
        manifest, weights_bytes = _read(Path(engine_dir), backend)
        name = name or manifest.model_name
        clash = next((entry for entry in entries if entry.name == name), None)
        if clash is not None:
            raise ConfigError(f"two engine dirs are named '{name}' ({clash.engine_dir} and {engine_dir}): "
                              "name them with --engine NAME=DIR")
        entries.append(ModelEntry(name, Path(engine_dir), manifest, weights_bytes))
    if not entries:
        raise ConfigError("no engine dir given: sdfast serve DIR [DIR ...] or --engine NAME=DIR")
    return entries


def _read(engine_dir: Path, backend: str) -> tuple[Manifest, int]:
    """The engine dir's manifest, and the bytes of the files ``backend`` loads from it."""
    manifest = read_manifest(engine_dir)
    _, files = loaded_components(manifest, backend)
    return manifest, sum(entry["bytes"] for entry in files.values())


def find_entry(entries: list[ModelEntry], requested: str) -> ModelEntry | None:
    """The entry a client names: its name, A1111 title ("name [hash]"), short hash, or the model name it was exported
    from where only one entry has that."""
    exact = next((e for e in entries if requested in (e.name, e.title, e.manifest.model_hash)), None)
    if exact is not None:
        return exact
    by_model = [e for e in entries if e.manifest.model_name == requested]
    return by_model[0] if len(by_model) == 1 else None


class ModelPool:
    """The server's models by name. ``pipeline(name)`` returns a loaded model, loading it first where needed.

    Loads run one at a time, off the event loop: a request for a loaded model never waits on another's load, and a
    request for a model that is loading waits for that load, no longer. Before a load, the least recently used models
    are unloaded until the budget holds; a model that requests are generating with (``use``) is unloaded only once
    they are done, so no job loses its engine.
    """

    def __init__(self, entries: list[ModelEntry], load: Callable[[ModelEntry], Pipeline], backend: str = "cpu",
                 max_loaded: int | None = None, max_memory_bytes: int | None = None):
        self.entries = {entry.name: entry for entry in entries}
        self.current = entries[0].name  # A1111's sd_model_checkpoint: the model of requests that name none
        self.max_loaded, self.max_memory_bytes = max_loaded, max_memory_bytes
        self._load, self.backend = load, backend
        self.on_event = lambda event, name, seconds: None  # ("load" | "unload", model, seconds): the server's metrics
        self._load_lock: asyncio.Lock | None = None
        self._unloading: set[str] = set()
        if max_loaded is not None and max_loaded < 1:
            raise ConfigError("--max-loaded must be at least 1")
        for entry in entries:
            if max_memory_bytes is not None and entry.weights_bytes > max_memory_bytes:
                raise ConfigError(f"model '{entry.name}' loads {entry.weights_bytes / GIB:.2f} GiB of weights, over --max-memory "
                                  f"({max_memory_bytes / GIB:.2f} GiB)")

    # -- names ------------------------------------------------------------------------------------------------

    def find(self, requested: str) -> ModelEntry | None:
        return find_entry(list(self.entries.values()), requested)

    def entry(self, requested: str | None, field: str) -> ModelEntry:
        """The entry ``requested`` names (the current model when None), or a RequestError naming ``field``."""
        from sdfast.serve.schemas import FieldError

        if requested in (None, ""):
            return self.entries[self.current]
        found = self.find(requested)
        if found is None:
            raise FieldError(field, f"no model '{requested}' on this server; it serves {', '.join(e.title for e in self.entries.values())}",
                             status=404 if field == "model" else 422)
        return found

    def refresh(self) -> None:
        """Read again the manifests of the models not loaded now (an engine dir exported anew since the start)."""
        for entry in list(self.entries.values()):
            if entry.pipeline is None and entry.loading is None:
                entry.manifest, entry.weights_bytes = _read(entry.engine_dir, self.backend)

    @property
    def loaded(self) -> list[ModelEntry]:
        return [entry for entry in self.entries.values() if entry.pipeline is not None]

    # -- loading ----------------------------------------------------------------------------------------------

    async def pipeline(self, name: str) -> Pipeline:
        """The loaded model ``name``, loading it first (and unloading others, if the budget says so) where needed."""
        entry = self.entries[name]
        while True:
            if entry.pipeline is not None and name not in self._unloading:
                entry.last_used = time.monotonic()
                return entry.pipeline
            if entry.loading is None:  # the pool's own task: a requester that goes away (timeout, disconnect) stops no load
                entry.loading = asyncio.ensure_future(self._load_entry(entry))
                entry.loading.add_done_callback(lambda task: task.cancelled() or task.exception())  # read: no "never retrieved"
            await asyncio.shield(entry.loading)  # this model's load, whoever asked first: its error is every waiter's

    @contextlib.asynccontextmanager
    async def use(self, name: str, timeout_s: float | None = None):
        """``(pipeline, hold)`` for one request: the model is not unloaded until the block ends, nor until every future
        given to ``hold`` is done (a job the worker still runs after its request went). TimeoutError when the model is
        not loaded within ``timeout_s``; its load goes on for the others."""
        entry = self.entries[name]
        pipeline = await asyncio.wait_for(self.pipeline(name), timeout_s)
        entry.users += 1
        holds: list[asyncio.Future] = []
        try:
            yield pipeline, holds.append
        finally:
            pending = [future for future in holds if not future.done()]
            if pending:
                asyncio.gather(*pending, return_exceptions=True).add_done_callback(lambda _: self._release(entry))
            else:
                self._release(entry)

    def _release(self, entry: ModelEntry) -> None:
        entry.users -= 1

    def load_now(self, name: str) -> None:
        """Load ``name`` before the server starts (the default model: a bad engine dir fails the start)."""
        entry = self.entries[name]
        entry.pipeline, entry.last_used = self._load(entry), time.monotonic()

    async def _load_entry(self, entry: ModelEntry) -> None:
        self._load_lock = self._load_lock or asyncio.Lock()
        try:
            async with self._load_lock:  # one load at a time: the budget is counted against what is loaded now
                if entry.pipeline is None:
                    await self._make_room(entry)
                    started = time.perf_counter()
                    try:
                        entry.pipeline = await asyncio.to_thread(self._load, entry)
                    except SdfastError as error:
                        raise EngineError(f"cannot load model '{entry.name}': {error}") from None
                    entry.last_used = time.monotonic()
                    self.on_event("load", entry.name, time.perf_counter() - started)
                self._unloading.discard(entry.name)
        finally:
            entry.loading = None

    def _over_budget(self, adding: ModelEntry) -> bool:
        loaded = [e for e in self.loaded if e is not adding]
        if self.max_loaded is not None and len(loaded) + 1 > self.max_loaded:
            return True
        return self.max_memory_bytes is not None and sum(e.weights_bytes for e in loaded) + adding.weights_bytes > self.max_memory_bytes

    async def _make_room(self, adding: ModelEntry) -> None:
        """Unload the least recently used models until ``adding`` fits: idle ones first, a busy one after its jobs."""
        while self._over_budget(adding):
            others = sorted((e for e in self.loaded if e is not adding), key=lambda e: e.last_used)
            if not others:  # alone over the budget (its engine dir re-exported larger since the start)
                raise EngineError(f"model '{adding.name}' loads {adding.weights_bytes / GIB:.2f} GiB of weights, over the "
                                  "server's memory budget")
            victim = next((e for e in others if not e.users), others[0])
            self._unloading.add(victim.name)  # new requests for it wait, and load it again after this load
            while victim.users:
                await asyncio.sleep(0.05)
            await self._unload(victim)

    async def _unload(self, entry: ModelEntry) -> None:
        started = time.perf_counter()
        entry.pipeline = None
        await asyncio.to_thread(gc.collect)  # onnxruntime's sessions (and their weights) go with the last reference
        self.on_event("unload", entry.name, time.perf_counter() - started)
