"""onnxruntime's CUDA provider (IO binding, CUDA graphs), with the sampler loop on the device.

It keeps the U-Net's inputs and outputs in fixed device buffers and expose ``table_loop`` (pipeline.py runs the
tabulated sampler through it): per evaluation, one U-Net launch (a CUDA graph replay), one sdfast_sampler_step kernel
and an event on the same stream; gpu_loop reports an evaluation once its event has completed, and a callback that
raises stops the loop between evaluations. The text encoder and VAE run once per image with host copies.

Written against onnxruntime-gpu's documented Python APIs and cuda-python; no GPU was available
where this was written, so none of it has run yet (README, "GPU backends").
"""
from __future__ import annotations

from pathlib import Path

from sdfast.errors import EngineError
from sdfast.runtime.backends.base import Engine
from sdfast.runtime.backends.gpu_common import _SharedStream, _gpu_count, _probe, log
from sdfast.runtime.backends.onnxruntime_cpu import OrtBackend, OrtEngine, _check_session_matches, add_overrides
from sdfast.runtime.cuda_unet import OrtCudaUnetEngine
from sdfast.runtime.manifest import ComponentInfo, confined


class OrtCudaEngine(OrtEngine):
    """A component on the CUDA provider, fed from numpy (text encoder, VAE: once per image)."""


class OrtCudaBackend(OrtBackend):
    """onnxruntime-gpu's CUDA provider: the export's CUDA variant (fp16, fused attention), cuDNN's exhaustive search."""

    def __init__(self):
        super().__init__("cuda", "CUDAExecutionProvider")
        self._stream = _SharedStream()

    def available(self) -> tuple[bool, str]:
        return _probe(self._available)

    def _available(self) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        return (True, "") if _gpu_count() else (False, "no CUDA device is visible")

    def graph_for(self, info: ComponentInfo) -> tuple[str, dict[str, dict]]:
        """The export's CUDA variant (fp16, fused attention) where there is one, else the portable graph."""
        variant = info.variants.get("cuda")
        return (variant["file"], variant["files"]) if variant else (info.file, info.files)

    def provider_options(self, info: ComponentInfo, cuda_graphs: bool) -> dict[str, str]:
        options = {
            "device_id": "0",
            "cudnn_conv_algo_search": "EXHAUSTIVE",  # each conv's fastest algorithm, measured once per session
            "cudnn_conv_use_max_workspace": "1",
            "prefer_nhwc": "1",  # NHWC convolutions, the tensor cores' layout
            "user_compute_stream": str(self._stream.get().pointer),
        }
        if cuda_graphs:
            options["enable_cuda_graph"] = "1"
        return options

    def load(self, info: ComponentInfo, path: Path, overrides=None) -> Engine:
        import onnxruntime as ort

        ok, why = self.available()
        if not ok:
            raise EngineError(f"backend 'cuda' is not available: {why}")
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # the CUDA and cuDNN libraries that pip's nvidia-* packages bring
        path = confined(path.parent, self.graph_for(info)[0])
        from sdfast.runtime.native import load_kernels

        cuda_graphs = info.role == "denoiser" and load_kernels() is not None
        session = None
        for graphs in ([True, False] if cuda_graphs else [False]):
            providers = [("CUDAExecutionProvider", self.provider_options(info, graphs)), "CPUExecutionProvider"]
            try:
                options = self.session_options(optimize=True)
                kept = add_overrides(options, overrides)
                session = ort.InferenceSession(str(path), options, providers=providers)
                cuda_graphs = graphs
                break
            except Exception as error:  # noqa: BLE001 - CUDA graphs need every node on the GPU; without them, retry once
                failure = str(error).splitlines()[0]
                log.info("%s: onnxruntime refused CUDA graphs (%s); loading without them", info.name, failure)
        if session is None:
            raise EngineError(f"cannot load {info.name} from '{path}' on CUDA: {failure}")
        if "CUDAExecutionProvider" not in session.get_providers():
            raise EngineError(f"{info.name}: onnxruntime fell back to the CPU (is onnxruntime-gpu installed, and CUDA 12/13 found?)")
        _check_session_matches(session, info)
        engine = OrtCudaUnetEngine(info, session, self._stream.get(), cuda_graphs) if info.role == "denoiser" else OrtCudaEngine(info, session)
        del kept  # onnxruntime copied the LoRA-merged initializers as it loaded the graph
        return engine
