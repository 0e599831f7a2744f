"""Does a dynamic spatial axis cost U-Net speed on the CPU? Static graphs at two sizes against one graph whose latent
height and width are dynamic, same weights, alternating in one run.

    python benchmarks/unet_dynamic_spatial.py [--model sd15] [--sizes 512x512 768x512] [--rounds 3 --calls 2] [--json F]

The U-Net of MODEL (a diffusers folder or a built-in) is exported with torch.onnx (dynamo) three ways: static at each
size, and once with its latent height and width dynamic (multiples of 8 latent cells). Each graph is optimized once by
onnxruntime (ORT_ENABLE_BASIC, as the export's portable graph) and saved again fully optimized (ORT_ENABLE_ALL, the
CPU's NCHWc layouts: what the export's CPU variant is without sdfast's own rewrites), so a load costs seconds; the
static graphs also get sdfast's CPU variant (Winograd F(2x2,3x3) and fused attention, which need static shapes).
Each round loads each graph in turn and times CALLS batch-2 steps (guidance) at each size it serves. Prints a Markdown
table of median (min-max) ms and each against the static graph at the same size.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def export(unet, path: Path, height: int, width: int, dynamic: bool) -> None:
    import torch

    class Plain(torch.nn.Module):  # (sample [2, 4, h, w], timestep [2], encoder_hidden_states [2, 77, D]) -> [2, 4, h, w]
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    hidden = unet.config.cross_attention_dim
    args = (torch.randn(2, 4, height // 8, width // 8), torch.full((2,), 500.0), torch.randn(2, 77, hidden))
    shapes = None
    if dynamic:  # latent sides in multiples of 8 cells (the U-Net downsamples three times), up to 192 cells
        h8, w8 = torch.export.Dim("h8", min=1, max=24), torch.export.Dim("w8", min=1, max=24)
        shapes = ({2: 8 * h8, 3: 8 * w8}, None, None)
    with torch.no_grad():
        program = torch.onnx.export(Plain(unet).eval(), args, input_names=["sample", "timestep", "encoder_hidden_states"],
                                    output_names=["noise_pred"], opset_version=18, dynamo=True, optimize=True, dynamic_shapes=shapes)
        program.save(str(path), external_data=True)


def optimized(raw: Path, level: str) -> Path:
    from sdfast.export.onnx_export import optimize_offline

    return optimize_offline(raw, raw.with_name(f"{raw.stem}.{level.lower()}.onnx"), level)[0]


def keep_only(folder: Path, kept: list[Path]) -> None:
    """Delete the intermediate graphs (a U-Net is 3.4 GB a copy): only the graphs timed stay, with their data."""
    names = {path.name for path in kept} | {path.name + ".data" for path in kept}
    for path in folder.iterdir():
        if path.name not in names:
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--sizes", nargs="+", default=["512x512", "768x512"], help="HxW, pixels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, help="keep the graphs here (default: a temporary dir)")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from diffusers import UNet2DConditionModel

    from sdfast.export.builtin import BUILTIN_MODELS, ensure_builtin
    from sdfast.export.onnx_export import rewrite_for_cpu

    folder = ensure_builtin(args.model) if args.model in BUILTIN_MODELS else Path(args.model)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes]
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="sdfast-dynamic-")  # 20 GB of graphs: removed at the end
    work = args.workdir or Path(scratch.name)
    graphs: dict[str, tuple[Path, list]] = {}  # label -> (graph, the sizes it serves)
    for height, width in sizes:
        raw = work / f"static_{height}x{width}" / "unet.onnx"
        raw.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        export(unet, raw, height, width, dynamic=False)
        basic = optimized(raw, "ORT_ENABLE_BASIC")
        graphs[f"static {height}x{width}, onnxruntime ALL"] = (optimized(basic, "ORT_ENABLE_ALL"), [(height, width)])
        rewrite_for_cpu(raw, raw.with_name("unet.rewritten.onnx"))
        graphs[f"static {height}x{width}, sdfast CPU variant"] = (optimized(raw.with_name("unet.rewritten.onnx"), "ORT_ENABLE_ALL"), [(height, width)])
        keep_only(raw.parent, [graph for graph, _ in list(graphs.values())[-2:]])
        print(f"exported static {height}x{width} in {time.perf_counter() - started:.0f} s", flush=True)
    raw = work / "dynamic" / "unet.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    export(unet, raw, *max(sizes), dynamic=True)  # traced at the largest: a side of 1 x 8 cells would be specialized
    graphs["dynamic H, W, onnxruntime ALL"] = (optimized(optimized(raw, "ORT_ENABLE_BASIC"), "ORT_ENABLE_ALL"), sizes)
    try:
        rewrite_for_cpu(raw, raw.with_name("unet.rewritten.onnx"), winograd=False)  # Winograd needs static shapes
        graphs["dynamic H, W, fused attention"] = (optimized(raw.with_name("unet.rewritten.onnx"), "ORT_ENABLE_ALL"), sizes)
    except Exception as error:  # noqa: BLE001 - the attention fusion may not match a dynamic graph; said, not fatal
        print(f"dynamic graph: attention fusion skipped ({type(error).__name__}: {error})")
    keep_only(raw.parent, [graph for label, (graph, _) in graphs.items() if label.startswith("dynamic")])
    print(f"exported dynamic in {time.perf_counter() - started:.0f} s", flush=True)
    hidden_width = unet.config.cross_attention_dim
    del unet

    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 77, hidden_width), dtype=np.float32)
    samples: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        for label, (graph, served) in graphs.items():
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # saved optimized
            options.log_severity_level = 3
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            for height, width in served:
                feeds = {"sample": rng.standard_normal((2, 4, height // 8, width // 8), dtype=np.float32),
                         "timestep": np.full(2, 500.0, np.float32), "encoder_hidden_states": hidden}
                session.run(None, feeds)  # warm-up: arena and caches at this size
                key = f"{label} @ {height}x{width}"
                for _ in range(args.calls):
                    started = time.perf_counter()
                    session.run(None, feeds)
                    samples.setdefault(key, []).append((time.perf_counter() - started) * 1e3)
            del session
        print(f"round {round_index + 1} done", flush=True)
    print("\n| graph @ size | median ms | min | max | / static ORT ALL at that size | / sdfast CPU variant at that size |\n|---|---|---|---|---|---|")
    for key, values in samples.items():
        size = key.rsplit("@ ", 1)[1]
        ort_all = statistics.median(samples[f"static {size}, onnxruntime ALL @ {size}"])
        variant = statistics.median(samples[f"static {size}, sdfast CPU variant @ {size}"])
        median = statistics.median(values)
        print(f"| {key} | {median:.0f} | {min(values):.0f} | {max(values):.0f} | {median / ort_all:.3f} | {median / variant:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"samples_ms": samples, "model": args.model, "sizes": args.sizes, "rounds": args.rounds,
                                         "calls": args.calls, "machine": platform.processor() or platform.machine(),
                                         "onnxruntime": ort.__version__, "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
