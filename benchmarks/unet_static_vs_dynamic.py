"""U-Net step latency of two ONNX U-Nets of the same model, alternating runs: e.g. a static-shape one against one with a
dynamic prompt-length axis (engine format 1 vs 2).

    python benchmarks/unet_static_vs_dynamic.py STATIC/unet.onnx DYNAMIC/unet.onnx [--repeat 10] [--latent 32]

Both load with onnxruntime's ORT_ENABLE_ALL on the CPU provider, take a batch-2 (guidance) step at 77 tokens, and the
second also at 154 tokens (a 2-chunk prompt). Prints median, min and max per case and the ratios of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path: str) -> tuple[ort.InferenceSession, float]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    started = time.perf_counter()
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("static")
    parser.add_argument("dynamic")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--hidden", type=int, default=768)
    args = parser.parse_args()
    (static, static_load), (dynamic, dynamic_load) = session(args.static), session(args.dynamic)
    print(f"load: static {static_load:.1f} s, dynamic {dynamic_load:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, args.latent, args.latent)).astype(np.float32)
    timestep = np.full(2, 500.0, np.float32)

    def feeds(tokens: int) -> dict[str, np.ndarray]:
        hidden = rng.standard_normal((2, tokens, args.hidden)).astype(np.float32)
        named = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden}
        # the ControlNet residuals (U-Nets exported since they exist): zeros, as generate feeds them without a ControlNet
        return {**{spec.name: np.zeros(spec.shape, np.float32) for spec in static.get_inputs() if spec.name not in named}, **named}

    cases = {"static, 77 tokens": (static, 77), "dynamic, 77 tokens": (dynamic, 77), "dynamic, 154 tokens": (dynamic, 154)}
    for engine, tokens in cases.values():
        engine.run(None, feeds(tokens))  # warm-up
    times = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, (engine, tokens) in cases.items():  # alternate, so drift on a shared machine hits every case alike
            inputs = feeds(tokens)
            started = time.perf_counter()
            engine.run(None, inputs)
            times[name].append((time.perf_counter() - started) * 1e3)
    base = statistics.median(times["static, 77 tokens"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<22} median {median:7.0f} ms  min {min(values):7.0f}  max {max(values):7.0f}  ratio {median / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
