"""The denoiser on onnxruntime's CUDA provider: IO binding by input name, a CUDA graph per conditioning shape, and the
tabulated sampler loop on the device (gpu_loop). Written against onnxruntime-gpu's documented API; not yet run on a GPU."""
from __future__ import annotations

import numpy as np

from sdfast.runtime.backends.onnxruntime_cpu import OrtEngine
from sdfast.runtime.device_loop import EvalCallback, LoopInputs, run_on_host
from sdfast.runtime.manifest import ComponentInfo


class _Bound:
    """One IO binding of the U-Net: device values for the sample, the timestep, each conditioning input and the output."""

    def __init__(self, binding, loop_options, call_options, values: dict, output):
        self.binding, self.loop_options, self.call_options, self.values, self.output = binding, loop_options, call_options, values, output


class OrtCudaUnetEngine(OrtEngine):
    """The U-Net with IO binding: fixed device buffers per conditioning shape (the prompt's length), a CUDA graph for each
    (gpu_graph_id). Every input is bound by its name: the family's conditioning arrays, then sample and timestep."""

    def __init__(self, info: ComponentInfo, session, stream, cuda_graphs: bool):
        super().__init__(info, session)
        self.stream, self.cuda_graphs = stream, cuda_graphs
        self._bound: dict[tuple, _Bound] = {}  # conditioning names and shapes -> binding
        self._loop = None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One call from numpy, through the bound buffers (a CUDA-graph session runs only through its binding)."""
        if not self.cuda_graphs:
            return super().run(feeds)
        from sdfast.runtime.cuda_device import download_from, upload_to

        feeds = self.check_feeds(feeds)
        conditioning = {name: value for name, value in feeds.items() if name not in ("sample", "timestep")}
        bound = self._binding(conditioning, feeds["sample"].shape[0])
        for name, value in feeds.items():
            upload_to(bound.values[name].data_ptr(), value, self.stream)
        self.session.run_with_iobinding(bound.binding, bound.call_options)
        return [download_from(bound.output.data_ptr(), tuple(bound.output.shape()), np.float32, self.stream)]

    def _binding(self, conditioning: dict[str, np.ndarray], rows: int) -> _Bound:
        import onnxruntime as ort

        key = tuple(sorted((name, tuple(value.shape)) for name, value in conditioning.items()))
        if key not in self._bound:
            sample_spec, output_spec = self.info.input("sample"), self.info.outputs[0]
            def device(shape, name=None):  # a device buffer of the input's own dtype (float32 unless the manifest says)
                dtype = np.dtype(self.info.input(name).dtype if name else "float32").type
                return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0)

            values = {"sample": device((rows, *sample_spec.shape[1:])), "timestep": device((rows,)),
                      **{name: device(shape, name) for name, shape in key}}
            output = device((rows, *output_spec.shape[1:]))
            binding = self.session.io_binding()
            for name, value in values.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(output_spec.name, output)
            graph_id = str(len(self._bound) + 1)  # one graph per conditioning shape; 0 is onnxruntime's own
            loop_options, call_options = ort.RunOptions(), ort.RunOptions()
            loop_options.add_run_config_entry("disable_synchronize_execution_providers", "1")  # the loop syncs once, at the end
            if self.cuda_graphs:
                loop_options.add_run_config_entry("gpu_graph_id", graph_id)
                call_options.add_run_config_entry("gpu_graph_id", graph_id)
            self._bound[key] = _Bound(binding, loop_options, call_options, values, output)
        return self._bound[key]

    def table_loop(self, inputs: LoopInputs, on_eval: EvalCallback | None) -> np.ndarray:
        from sdfast.runtime.gpu_loop import GpuLoop
        from sdfast.runtime.native import load_kernels

        kernels = load_kernels()
        if kernels is None or not self.cuda_graphs:
            return run_on_host(self, inputs, on_eval)  # no kernels built: the update runs on the host each step
        from sdfast.runtime.cuda_device import upload_to

        table, rows = inputs.table, inputs.unet_rows
        bound = self._binding(inputs.conditioning, rows)
        repeat = 2 if inputs.guided else 1
        upload_to(bound.values["sample"].data_ptr(), np.concatenate([inputs.x * table.c_in[0]] * repeat).astype(np.float32), self.stream)
        upload_to(bound.values["timestep"].data_ptr(), np.full((rows,), table.timesteps[0], np.float32), self.stream)
        for name, value in inputs.conditioning.items():
            upload_to(bound.values[name].data_ptr(), value.astype(self.info.input(name).dtype), self.stream)
        if self._loop is None:
            self._loop = GpuLoop(self.stream, kernels, inputs.x.shape)
        stride = int(np.prod(self.info.input("sample").shape[1:]))
        return self._loop.run(inputs, bound.values["sample"].data_ptr(), bound.values["timestep"].data_ptr(), bound.output.data_ptr(),
                              stride, lambda: self.session.run_with_iobinding(bound.binding, bound.loop_options), on_eval)
