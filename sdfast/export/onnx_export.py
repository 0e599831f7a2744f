"""torch -> static-shape ONNX, then onnxruntime's offline graph optimization into the engine dir."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from sdfast.export.recipe import ComponentRecipe

# Models above this many bytes of weights keep them in a side file (protobuf caps one file at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter narrates each pass on stdout and warns liberally; sdfast reports progress itself."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_to_onnx(module: torch.nn.Module, recipe: ComponentRecipe, inputs: dict[str, np.ndarray], path: Path, opset: int) -> None:
    """Trace ``module`` with torch.export at the recipe's shapes (fixed, but for its declared dynamic axes) and save ONNX."""
    args = tuple(torch.from_numpy(inputs[t.name]) for t in recipe.inputs)
    dynamic_shapes = None
    if recipe.dynamic:
        multiples = {name: torch.export.Dim(name, min=1, max=dim.max_multiple) for name, dim in recipe.dynamic.items()}
        dynamic_shapes = tuple(
            {axis: recipe.dynamic[d].multiple_of * multiples[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} or None
            for t in recipe.inputs
        )
    weights_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
        model = module.eval()
        if _has_varargs(module):  # torch.onnx turns a *args group's shapes into a list, which torch.export refuses
            model = torch.export.export(model, args, dynamic_shapes=_group_varargs(module, dynamic_shapes or (None,) * len(args)))
            dynamic_shapes = None
        program = torch.onnx.export(
            model,
            args,
            input_names=[t.name for t in recipe.inputs],
            output_names=[t.name for t in recipe.outputs],
            opset_version=opset,
            dynamo=True,
            optimize=True,
            dynamic_shapes=dynamic_shapes,
        )
        program.save(str(path), external_data=weights_bytes > EXTERNAL_DATA_THRESHOLD)
    _check_static(path, recipe)


def _has_varargs(module: torch.nn.Module) -> bool:
    """Whether ``forward`` ends in ``*args`` (the U-Net's ControlNet residuals)."""
    import inspect

    parameters = list(inspect.signature(module.forward).parameters.values())
    return bool(parameters) and parameters[-1].kind is inspect.Parameter.VAR_POSITIONAL


def _group_varargs(module: torch.nn.Module, dynamic_shapes: tuple) -> tuple:
    """torch.export reads a forward's ``*args`` as one tuple: group their shape specs alike."""
    import inspect

    named = len(inspect.signature(module.forward).parameters) - 1
    extra = tuple(dynamic_shapes[named:])  # none: torch.export sees no *args at all (a U-Net without residual inputs)
    return (*dynamic_shapes[:named], extra) if extra else tuple(dynamic_shapes[:named])


def _check_static(path: Path, recipe: ComponentRecipe) -> None:
    model = onnx.load(str(path), load_external_data=False)
    if (len(model.graph.input), len(model.graph.output)) != (len(recipe.inputs), len(recipe.outputs)):
        raise RuntimeError(f"exported {path.name}: {len(model.graph.input)} inputs and {len(model.graph.output)} outputs, the recipe has {len(recipe.inputs)} and {len(recipe.outputs)}")
    for value, expected in zip(list(model.graph.input) + list(model.graph.output), recipe.inputs + recipe.outputs):
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
        wanted = tuple(-1 if isinstance(d, str) else d for d in expected.shape)  # dynamic axes are symbolic in the graph
        if value.name != expected.name or dims != wanted:
            raise RuntimeError(f"exported {path.name}: {value.name}{dims} differs from the recipe's {expected.name}{expected.shape}")


def optimize_offline(raw: Path, out: Path, level: str = "ORT_ENABLE_BASIC") -> list[Path]:
    """Run onnxruntime's graph optimizations once and save the result; returns the files written.

    ORT_ENABLE_BASIC (constant folding, redundant nodes) keeps to standard ONNX ops, so the file serves every
    onnxruntime provider and TensorRT's ONNX parser; ORT_ENABLE_ALL adds contrib ops and the CPU's blocked (NCHWc)
    layouts, so its file is for the CPU provider of this onnxruntime version only.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")  # nothing runs here: no packed copy of the weights
    # the weights go to a side file (page-aligned by onnxruntime): the runtime reads a LoRA's base weights from there
    data_name = out.name + ".data"
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    return [path for path in (out, out.with_name(data_name)) if path.exists()]  # no side file when every weight is small


WINOGRAD_MIN_TILES = 64  # 3x3 convolutions on maps of at least 16x16: below that the larger weights cost more than they save


def rewrite_for_cpu(raw: Path, out: Path, winograd: bool = True) -> dict[str, int]:
    """The CPU variant's graph: 3x3 convolutions as Winograd F(2x2, 3x3) (where ``winograd``), attention as
    MultiHeadAttention.

    Measured on the sd15 U-Net (benchmarks/results/README.md); both keep fp32 and pass the export's parity check.
    Winograd is for the denoiser only: its tile tensors are 4x the input map, which on a VAE at 1024x1024 (128 channels
    at full size) is GBs per convolution (the SDXL export was killed at 23.1 GiB running such a VAE decoder).
    The weights are never all in memory (SDXL's U-Net is 10 GB): the graph is read without them, each convolution's
    weight is read when it is rewritten, and the new weights go straight to ``out``'s data file. The weights left as
    they were stay in ``raw``'s data file, which ``out`` references (both in one folder; onnxruntime then writes the
    variant's own files).
    """
    from sdfast.export.attention import fuse_attention
    from sdfast.export.winograd import rewrite_convolutions

    if out.parent != raw.parent:
        raise ValueError(f"the rewritten graph references {raw.name}'s data: write it beside it, not in {out.parent}")
    model = onnx.load(str(raw), load_external_data=False)
    del model.graph.value_info[:]  # stale after the rewrites; onnxruntime infers its own
    with _ExternalWriter(out.with_name(out.name + ".data")) as writer:
        weights = _LazyWeights(model.graph, raw.parent)
        model, convolutions = rewrite_convolutions(model, weights, WINOGRAD_MIN_TILES, writer.initializer) if winograd else (model, 0)  # first: it needs ONNX's shape inference
        model, attentions = fuse_attention(model)
    onnx.save(model, str(out))  # the graph alone: every large tensor is external by now
    return {"winograd_f2x2_3x3": convolutions, "fused_attention": attentions}


class _LazyWeights:
    """A graph's initializers as arrays, each read (from external data if there) when asked for and not kept."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path):
        self.tensors = {init.name: init for init in graph.initializer}
        self.base_dir = str(base_dir)

    def get(self, name: str, default=None):
        from onnx import numpy_helper

        tensor = self.tensors.get(name)
        return default if tensor is None else numpy_helper.to_array(tensor, self.base_dir)

    def __getitem__(self, name: str):
        if name not in self.tensors:
            raise KeyError(name)
        return self.get(name)


class _ExternalWriter:
    """Appends arrays to one external-data file and gives TensorProtos that reference them (small ones stay inline)."""

    ALIGN = 4096  # page-aligned offsets: onnxruntime can map them

    def __init__(self, path: Path, inline_below: int = 1024):
        self.path, self.inline_below = path, inline_below
        self.handle = None

    def __enter__(self):
        self.handle = open(self.path, "wb")
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def initializer(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        from onnx import helper, numpy_helper

        if array.nbytes < self.inline_below:
            return numpy_helper.from_array(array, name)
        self.handle.write(b"\0" * (-self.handle.tell() % self.ALIGN))
        offset = self.handle.tell()
        self.handle.write(np.ascontiguousarray(array).tobytes())  # ONNX's raw data is little-endian, as this machine
        tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor


def rewrite_for_cuda(raw: Path, out: Path, ort_model_type: str) -> dict[str, int]:
    """The CUDA variant's fp32 graph: attention as MultiHeadAttention (flash attention on the CUDA provider), then
    onnxruntime's transformer optimizer with its GPU fusions for ``ort_model_type`` (unet, clip, vae).

    Returns the fused-op counts, so the manifest shows which fusions matched this exporter's graph. The optimizer's
    NhwcConv is left off: without a fused NHWC GroupNorm beside it, it wraps each Conv in two Transposes; the cuda
    backend asks the provider for NHWC convolutions instead (``prefer_nhwc``).
    """
    import collections

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from sdfast.export.attention import fuse_attention

    model = onnx.load(str(raw))
    del model.graph.value_info[:]
    model, attentions = fuse_attention(model)
    options = FusionOptions(ort_model_type)
    options.enable_nhwc_conv = False
    options.enable_packed_qkv = False  # the fused MHA above takes Q, K, V apart
    options.enable_packed_kv = False
    with _quiet_exporter(), contextlib.redirect_stderr(io.StringIO()):
        optimized = optimize_model(model, model_type=ort_model_type, num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=options, use_gpu=True)
    fused = collections.Counter(node.op_type for node in optimized.model.graph.node if node.domain == "com.microsoft")
    onnx.save(optimized.model, str(out), save_as_external_data=True, location=out.name + ".data", size_threshold=1024)
    return {"fused_attention": attentions, **{f"com.microsoft.{op}": n for op, n in sorted(fused.items())}}
