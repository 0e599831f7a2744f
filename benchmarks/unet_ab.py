"""A/B of U-Net ONNX files in one process: load them all, then alternate calls, so a noisy machine hurts each alike.

    python benchmarks/unet_ab.py --size 256 [--rounds 6] A.onnx B.onnx ...

Feeds are seeded random latents, timestep 500 and random prompt embeddings (batch 2, one 77-token chunk).
Prints median, min and max ms per file, and the largest relative output difference to the first file.
This is how the CPU-variant rewrites in benchmarks/results/README.md were compared.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]) for path in args.files]
    rng = np.random.default_rng(0)
    latent = args.size // 8
    feeds = {"sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),  # [2, 4, H/8, W/8]
             "timestep": np.full(2, 500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}  # [2, 77, 768]
    for session in sessions:  # any other input (the ControlNet residuals) gets zeros, as generate feeds them without one
        for spec in session.get_inputs():
            if spec.name not in feeds:  # (the prompt axis is symbolic: encoder_hidden_states is always fed above)
                feeds[spec.name] = np.zeros(spec.shape, np.float32)
    outputs = [s.run(None, feeds)[0] for s in sessions]  # warm-up
    times = [[] for _ in sessions]
    for _ in range(args.rounds):
        for session, samples in zip(sessions, times):
            started = time.perf_counter()
            session.run(None, feeds)
            samples.append((time.perf_counter() - started) * 1e3)
    for path, samples, output in zip(args.files, times, outputs):
        diff = np.abs(output - outputs[0]).max() / np.abs(outputs[0]).max()
        print(f"{path}: median {statistics.median(samples):.0f} ms, min {min(samples):.0f}, max {max(samples):.0f}; max_rel vs first {diff:.1e}")


if __name__ == "__main__":
    main()
