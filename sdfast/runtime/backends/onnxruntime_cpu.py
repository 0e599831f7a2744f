"""onnxruntime on the CPU: the export's pre-optimized CPU variant where it suits this CPU, the portable graph otherwise."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.backends.base import Backend, Engine
from sdfast.runtime.manifest import ComponentInfo, confined


@functools.cache
def cpu_isa() -> str:
    """The widest x86 vector ISA here (onnxruntime's NCHWc block size follows it): avx512f, avx2, or other."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


class OrtEngine(Engine):
    def __init__(self, info: ComponentInfo, session, run_options=None):
        super().__init__(info)
        self.session = session
        self.output_names = [spec.name for spec in info.outputs]
        self.run_options = run_options

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(self.output_names, self.check_feeds(feeds), self.run_options)
        except EngineError:
            raise
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own hierarchy
            raise EngineError(f"{self.info.name}: onnxruntime failed: {str(error).splitlines()[0]}") from None


class OrtBackend(Backend):
    """onnxruntime with one execution provider.

    Where the export saved a variant fully optimized for this provider by this onnxruntime version (the CPU's
    NCHWc layouts), it loads with optimizations off: a cold start of seconds instead of a re-optimization.
    """

    can_override_initializers = True

    def __init__(self, name: str, provider: str, threads: int = 0):
        self.name = name
        self.provider = provider
        self.threads = threads

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as error:
            return False, f"onnxruntime is not installed ({error})"
        if self.provider not in ort.get_available_providers():
            return False, f"onnxruntime {ort.__version__} has no {self.provider} (install onnxruntime-gpu for cuda)"
        return True, ""

    def session_options(self, optimize: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        level = ort.GraphOptimizationLevel
        options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        return options

    def _preoptimized(self, info: ComponentInfo) -> dict | None:
        """The export's variant for this provider when this onnxruntime can load it as saved, else None."""
        import onnxruntime as ort

        variant = info.variants.get(self.name)
        made_for = (variant or {}).get("optimization", {})
        # the NCHWc blocks in that file depend on the onnxruntime version and on the vector ISA it was saved on
        usable = variant is not None and made_for.get("onnxruntime") == ort.__version__ and made_for.get("isa") == cpu_isa()
        return variant if usable else None

    def graph_for(self, info: ComponentInfo) -> tuple[str, dict[str, dict]]:
        variant = self._preoptimized(info)
        return (variant["file"], variant["files"]) if variant else (info.file, info.files)

    def load(self, info: ComponentInfo, path: Path, overrides: dict[str, np.ndarray] | None = None) -> Engine:
        import onnxruntime as ort

        ok, why = self.available()
        if not ok:
            raise EngineError(f"backend '{self.name}' is not available: {why}")
        preoptimized = self._preoptimized(info) is not None
        if preoptimized:
            path = confined(path.parent, self.graph_for(info)[0])  # beside the graph, at the engine dir's top level (manifest.py checks)
        options = self.session_options(optimize=not preoptimized)
        if self.provider == "CPUExecutionProvider" and info.role in ("vae_decoder", "vae_encoder"):
            # the VAE's activations are the largest of a generation (4.5 GiB at 1024x1024) and come once per image:
            # without an arena they are freed as they die (SDXL 1024: 4.1 GiB peak instead of 4.9 GiB for the decoder)
            options.enable_cpu_mem_arena = False
        kept = add_overrides(options, overrides)
        shared = share_weights(options, info, path, set(overrides or ())) if self.provider == "CPUExecutionProvider" else []
        try:
            session = ort.InferenceSession(str(path), options, providers=[self.provider])
        except Exception as error:  # noqa: BLE001
            raise EngineError(f"cannot load {info.name} from '{path}': {str(error).splitlines()[0]}") from None
        del kept  # onnxruntime copied them into the session's own tensors (tests/test_lora.py checks): their memory goes back now
        _check_session_matches(session, info)
        engine = OrtEngine(info, session, self.run_options(arena=options.enable_cpu_mem_arena))
        engine.shared_weights = shared  # the session computes from their memory: they live as long as it
        return engine

    def run_options(self, arena: bool = True):
        """Each call hands its activations' memory back when it ends: every session has its own arena, so without
        this an SDXL generation at 1024x1024 holds the U-Net's 3 GiB and the VAE decoder's beside each other."""
        import onnxruntime as ort

        options = ort.RunOptions()
        if self.provider == "CPUExecutionProvider" and arena:  # (onnxruntime refuses to shrink an arena that is not there)
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return options


def add_overrides(options, overrides: dict[str, np.ndarray] | None) -> list:
    """Give the session ``overrides`` in place of the graph's stored (external-data) initializers; returns what must
    live until the session is made. onnxruntime copies them as it loads the graph, as it would copy from the file.

    add_external_initializers, not add_initializer: the arrays stand in for the data file as the graph loads, so every
    optimization at load (constant folding, NCHWc reorders, fp16 casts) starts from them. Measured with onnxruntime
    1.31: add_initializer's overrides were partly lost when the graph was optimized at load (a portable fp32 graph's
    LoRA image at 24.6 dB from diffusers'), and wholly on an fp16 graph on the CPU.
    """
    import onnxruntime as ort

    if not overrides:
        return []
    arrays = [np.ascontiguousarray(array) for array in overrides.values()]
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
    options.add_external_initializers(list(overrides), values)
    return [*arrays, *values]


def share_weights(options, info: ComponentInfo, path: Path, overridden: set[str]) -> list:
    """Hand the session the component's shared weights (every size's graph maps one data file) as arrays over one memory
    map, with prepacking off, so the sessions of all sizes hold one copy; returns what must live as long as the session."""
    import onnxruntime as ort

    from sdfast.runtime.backends.shared_weights import shared_arrays

    mapping, arrays = shared_arrays(info, path, overridden)
    if not arrays:
        return []
    options.add_session_config_entry("session.disable_prepacking", "1")  # a packed copy would be per session
    values: list = [mapping]
    for name, array in arrays.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(name, value)
        values.append(value)
    return values


def _check_session_matches(session, info: ComponentInfo) -> None:
    graph_inputs = {i.name: tuple(i.shape) for i in session.get_inputs()}
    for spec in info.inputs:
        graph_shape = graph_inputs.get(spec.name)
        # onnxruntime reports a symbolic axis by its name (a str) or None; the manifest names it too
        matches = graph_shape is not None and len(graph_shape) == len(spec.shape) and all(
            (not isinstance(g, int)) if isinstance(d, str) else g == d for g, d in zip(graph_shape, spec.shape)
        )
        if not matches:
            raise EngineError(f"{info.name}: the ONNX file's input '{spec.name}' {graph_inputs.get(spec.name)} differs from the manifest's {spec.shape}")
