"""TensorRT 10: engines built from the portable graph (cached by the manifest's keys), CUDA graphs, the loop on the device.

Written against TensorRT 10's documented Python API and cuda-python; TensorRT cannot be installed where this was written,
so none of it has run yet (README, "GPU backends").
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from sdfast.errors import EngineError
from sdfast.runtime.backends.base import Backend, Engine
from sdfast.runtime.backends.gpu_common import _SharedStream, _first_line, _gpu_count, _probe, log
from sdfast.runtime.device_loop import EvalCallback, LoopInputs, run_on_host
from sdfast.runtime.manifest import ComponentInfo

Progress = Callable[[str], None]


def _trt():
    """The tensorrt module; an EngineError when it is missing or cannot load (its libraries, a CUDA mismatch)."""
    try:
        import tensorrt
    except ImportError as error:
        raise EngineError(f"TensorRT is not installed ({error})") from None
    except Exception as error:  # noqa: BLE001 - tensorrt loads native libraries at import
        raise EngineError(f"TensorRT cannot be imported: {_first_line(error)}") from None
    return tensorrt


class _BuildProgress:
    """TensorRT's IProgressMonitor, reporting each top-level phase (building takes minutes)."""

    def __new__(cls, trt, label: str, report: Progress):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                if parent_phase is None:
                    report(f"{label}: {phase_name} ({num_steps} steps)")

            def step_complete(self, phase_name, step):
                return True  # never cancel

            def phase_finish(self, phase_name):
                pass

        return Monitor()


def build_plan(info: ComponentInfo, onnx_path: Path, profile, timing_cache: Path, report: Progress) -> bytes:
    """A serialized TensorRT engine from the ONNX graph: strongly typed (fp16 where the graph is), one shape profile."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external weights next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{info.name}: TensorRT cannot parse {onnx_path.name}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        report(f"tensorrt {info.name}: the timing cache {timing_cache} does not fit this GPU or TensorRT; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    shapes = builder.create_optimization_profile()
    for name, low, optimal, high in profile:
        shapes.set_shape(name, low, optimal, high)
    config.add_optimization_profile(shapes)
    monitor = _BuildProgress(trt, f"tensorrt {info.name}", report)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{info.name}: TensorRT could not build an engine (see its log above)")
    timing_cache.parent.mkdir(exist_ok=True)
    from sdfast.runtime.trt_cache import _atomic_write

    _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


class TrtEngine(Engine):
    """A deserialized TensorRT engine with device buffers at its largest shapes, allocated once."""

    def __init__(self, info: ComponentInfo, engine, stream):
        super().__init__(info)
        from sdfast.runtime.cuda_device import DeviceBuffer

        trt = _trt()
        self.engine, self.stream = engine, stream
        self.context = engine.create_execution_context()
        self.buffers = {}
        for spec in (*info.inputs, *info.outputs):
            largest = tuple(d if isinstance(d, int) else info.dynamic[d].max for d in spec.shape)
            dtype = trt.nptype(engine.get_tensor_dtype(spec.name))
            self.buffers[spec.name] = DeviceBuffer(largest, dtype)
            self.context.set_tensor_address(spec.name, self.buffers[spec.name].pointer)
        self._graphs: dict[tuple, object] = {}
        self._shapes: dict[str, tuple] = {}  # the context's input shapes now
        self._enqueued_shapes: dict[str, tuple] = {}  # the shapes of the last eager run (a graph replays only after one)
        self._loop = None

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.pointer):
            raise EngineError(f"{self.info.name}: TensorRT execution failed")
        self._enqueued_shapes = dict(self._shapes)

    def _set_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        for name, value in feeds.items():
            if tuple(value.shape) != self._shapes.get(name):
                if not self.context.set_input_shape(name, tuple(value.shape)):
                    raise EngineError(f"{self.info.name}: TensorRT refused shape {tuple(value.shape)} for '{name}'")
                self._shapes[name] = tuple(value.shape)
            self.buffers[name].upload(value, self.stream)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._set_inputs(self.check_feeds(feeds))
        self._enqueue()
        outputs = [self.buffers[spec.name].download(self.stream, tuple(self.context.get_tensor_shape(spec.name))) for spec in self.info.outputs]
        return [o.astype(np.float32) if o.dtype == np.float16 else o for o in outputs]

    def table_loop(self, inputs: LoopInputs, on_eval: EvalCallback | None) -> np.ndarray:
        from sdfast.runtime.cuda_device import CudaGraph
        from sdfast.runtime.gpu_loop import GpuLoop
        from sdfast.runtime.native import load_kernels

        kernels = load_kernels()
        if kernels is None:
            return run_on_host(self, inputs, on_eval)
        table, rows, repeat = inputs.table, inputs.unet_rows, 2 if inputs.guided else 1
        sample = np.concatenate([inputs.x * table.c_in[0]] * repeat).astype(np.float32)
        self._set_inputs(self.check_feeds({**inputs.conditioning, "sample": sample,
                                           "timestep": np.full((rows,), table.timesteps[0], np.float32)}))
        shape = inputs.shapes
        if shape not in self._graphs or self._enqueued_shapes != self._shapes:
            # TensorRT updates its state lazily on the first run after a shape change; a graph replays only after one
            self._enqueue()
            self.stream.synchronize()  # that run reads the inputs and writes only the output: evaluation 0's input stays
        if shape not in self._graphs:
            self._graphs[shape] = CudaGraph(self.stream, self._enqueue)  # captured, not run
        if self._loop is None:
            self._loop = GpuLoop(self.stream, kernels, inputs.x.shape)
        stride = int(np.prod(self.info.input("sample").shape[1:]))
        graph = self._graphs[shape]
        return self._loop.run(inputs, self.buffers["sample"].pointer, self.buffers["timestep"].pointer,
                              self.buffers[self.info.outputs[0].name].pointer, stride, lambda: graph.replay(self.stream), on_eval)


class TensorRTBackend(Backend):
    """TensorRT 10 engines built on first use from the export's portable graphs, cached in the engine dir (trt_cache)."""

    name = "tensorrt"

    def __init__(self):
        self._stream = _SharedStream()
        self.progress: Progress = log.info  # the CLI points this at its progress display

    def available(self) -> tuple[bool, str]:
        return _probe(self._available)

    def _available(self) -> tuple[bool, str]:
        trt = _trt()
        if not _gpu_count():
            return False, f"TensorRT {trt.__version__} is installed but no CUDA device is visible"
        return True, ""

    def cannot_run(self, info: ComponentInfo) -> str | None:
        if info.precision == "int8":  # the graph is onnxruntime's (MatMulInteger, DynamicQuantizeLinear), not TensorRT's
            return (f"{info.name} is int8 (onnxruntime's dynamic quantization: MatMulInteger), which TensorRT does not "
                    "parse; export it in fp16 for TensorRT (for SD3's T5: --t5 fp16)")
        return None

    def key(self, info: ComponentInfo):
        from sdfast.runtime.cuda_device import device_info
        from sdfast.runtime.trt_cache import key_for

        gpu = device_info()
        return key_for(info, gpu.name, gpu.compute_capability, _trt().__version__)

    def load(self, info: ComponentInfo, path: Path, overrides=None) -> Engine:
        from sdfast.runtime import trt_cache

        if overrides:
            raise EngineError("tensorrt: LoRAs at run time need an engine refit, which sdfast does not do yet (export with --lora)")
        refused = self.cannot_run(info)
        if refused:
            raise EngineError(refused)
        ok, why = self.available()
        if not ok:
            raise EngineError(f"backend 'tensorrt' is not available: {why}")
        engine_dir = path.parent
        key = self.key(info)
        plan = trt_cache.lookup(engine_dir, key)
        if plan is None:
            trt_cache.writable(engine_dir)
            self.progress(f"tensorrt {info.name}: building an engine for {key.gpu_name} (sm {key.compute_capability}, "
                          f"TensorRT {key.tensorrt_version}); minutes, once per GPU model")
            started = time.perf_counter()
            data = build_plan(info, path, key.profile, trt_cache.timing_cache_path(engine_dir), self.progress)
            plan = trt_cache.record(engine_dir, key, data, time.perf_counter() - started)
            self.progress(f"tensorrt {info.name}: built in {time.perf_counter() - started:.0f} s -> {plan.name}")
        trt = _trt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        try:
            plan_bytes = plan.read_bytes()
        except OSError as error:  # another process replaced a stale plan between lookup and here
            raise EngineError(f"{info.name}: cannot read the TensorRT engine {plan.name}: {error.strerror or error} (load again)") from None
        engine = runtime.deserialize_cuda_engine(plan_bytes)
        if engine is None:
            raise EngineError(f"{info.name}: TensorRT could not load {plan} (delete it to rebuild)")
        return TrtEngine(info, engine, self._stream.get())
