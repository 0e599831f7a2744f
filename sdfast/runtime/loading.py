"""Pipeline.load's work: check the manifest and backend, verify the files, create the engines of every size."""
from __future__ import annotations

import time
from pathlib import Path

from sdfast.errors import EngineError
from sdfast.runtime.backends import get_backend
from sdfast.runtime.controlnets import ControlNets
from sdfast.runtime.families import family_class
from sdfast.runtime.int8_unet import ROLES as INT8_ROLES
from sdfast.runtime.manifest import read_manifest
from sdfast.runtime.request_check import read_scheduler_config


def load_pipeline(cls, engine_dir: str | Path, backend: str, verify: str, progress) -> "Pipeline":  # noqa: F821
    """The engine dir's pipeline at its default size; ``pipeline.sizes`` holds one per size, sharing the text encoders
    (and, through the backend, one copy of the weights). ``progress(stage, done, total)``: 'verify' in bytes, 'load' in
    sessions."""
    started = time.perf_counter()
    manifest = read_manifest(engine_dir)
    runtime_backend = get_backend(backend)
    family = family_class(manifest.family)
    components, files = loaded_components(manifest, backend)
    manifest.verify_files(full=verify == "full", files=files,
                          progress=(lambda done, total: progress("verify", done, total)) if progress else None)
    scheduler_config = read_scheduler_config(manifest)
    verified = time.perf_counter()
    other_sizes = {size: manifest.at_size(*size) for size in manifest.sizes[1:]}
    sized_components = [info.name for info in components if info.sizes]
    total, done = len(components) + len(sized_components) * len(other_sizes), 0

    def load(info, path):
        nonlocal done
        if progress:
            progress("load", done, total)
        engine = runtime_backend.load(info, path)
        done += 1
        return engine

    engines = {info.name: load(info, manifest.path(info.file)) for info in components}
    for input_name in ("sample", "timestep"):  # the denoiser's own inputs; the family checks what it feeds
        engines[manifest.denoiser].info.input(input_name)
    pipeline = cls(manifest, engines, family(manifest, engines), scheduler_config, backend)
    pipeline.controlnets = ControlNets(manifest, runtime_backend, verify)
    pipeline.loras.backend = runtime_backend
    for size, at in other_sizes.items():  # their own U-Net and VAE sessions, the same text encoders
        sized = {name: load(at.components[name], at.path(at.components[name].file)) if name in sized_components else engine
                 for name, engine in engines.items()}
        sibling = cls(at, sized, family(at, sized), scheduler_config, backend)
        sibling.controlnets = ControlNets(at, runtime_backend, verify)
        sibling.loras.backend = runtime_backend
        sibling.sizes = pipeline.sizes
        pipeline.sizes[size] = sibling
    if progress:
        progress("load", total, total)
    finished = time.perf_counter()
    pipeline.load_timings = {"verify_s": verified - started, "engines_s": finished - verified, "total_s": finished - started}
    for sibling in pipeline.sizes.values():
        sibling.load_timings = pipeline.load_timings
    return pipeline


def loaded_components(manifest, backend: str) -> tuple[list, dict[str, dict]]:
    """The components ``backend`` loads from the engine dir, and every file it reads for them (every size's), as the
    manifest lists them: what a load verifies, and the weights a loaded model holds. Refuses, before any file is read,
    a backend that is absent or cannot run one of them."""
    runtime_backend = get_backend(backend)
    components = [manifest.components[name] for name in family_class(manifest.family).check_components(manifest)]
    if backend != "cpu":  # the int8 U-Nets are onnxruntime's CPU graphs (QLinearConv, QGemm): other backends leave them
        components = [info for info in components if info.role not in INT8_ROLES]
    for info in components:  # before gigabytes are hashed, or engines built, for a graph the backend cannot run
        refused = runtime_backend.cannot_run(info)
        if refused:
            raise EngineError(refused)
    usable, why = runtime_backend.available()  # before gigabytes are hashed for a backend that cannot run here
    if not usable:
        raise EngineError(f"backend '{backend}' is not available: {why}")
    other_sizes = [manifest.at_size(*size) for size in manifest.sizes[1:]]
    files = {name: entry for tokenizer in manifest.tokenizers.values() for name, entry in tokenizer["files"].items()}
    files.update(manifest.data["scheduler"]["files"])
    for info in components:
        files.update(runtime_backend.files_for(info))
        for at in other_sizes if info.sizes else ():
            files.update(runtime_backend.files_for(at.components[info.name]))
    return components, files
