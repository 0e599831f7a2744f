"""The U-Net step of a multi-size engine dir (shared, memory-mapped weights, prepacking off) against a single-size one
(its own weights, prepacked), alternating in one process.

    python benchmarks/sizes_step.py SINGLE_DIR MULTI_DIR [--rounds 5] [--calls 2] [--json out.json]

Both at the single dir's size, same feeds (guidance batch, 77 tokens, zero ControlNet residuals). Prints the median
and range per engine and the median of the per-round ratios multi / single.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def feeds_for(engine) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in engine.info.inputs:
        shape = [d if isinstance(d, int) else 77 for d in spec.shape]
        feeds[spec.name] = (np.full(shape, 500.0, np.float32) if spec.name == "timestep" else
                            rng.standard_normal(shape).astype(np.float32) * (0.0 if spec.name.startswith(("down_block", "mid_block")) else 1.0))
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("single", type=Path)
    parser.add_argument("multi", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from sdfast.runtime.pipeline import Pipeline

    single = Pipeline.load(args.single, verify="size")
    multi = Pipeline.load(args.multi, verify="size").at_size(single.width, single.height)
    engines = {"single-size (prepacked)": single.engines["unet"], "multi-size (shared, no prepack)": multi.engines["unet"]}
    feeds = feeds_for(single.engines["unet"])
    for engine in engines.values():  # warm-up: the first call maps and packs
        engine.run(feeds)
    times: dict[str, list[float]] = {name: [] for name in engines}
    ratios = []
    for round_index in range(args.rounds):
        medians = {}
        for name, engine in engines.items():
            calls = []
            for _ in range(args.calls):
                started = time.perf_counter()
                engine.run(feeds)
                calls.append(time.perf_counter() - started)
            times[name] += calls
            medians[name] = statistics.median(calls)
        names = list(engines)
        ratios.append(medians[names[1]] / medians[names[0]])
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {m:.2f} s" for n, m in medians.items()) + f", ratio {ratios[-1]:.3f}", flush=True)
    record = {"size": f"{single.width}x{single.height}", "rounds": args.rounds, "calls": args.calls,
              "engines": {name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3), "max_s": round(max(t), 3)}
                          for name, t in times.items()},
              "ratio_multi_over_single": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                          "max": round(max(ratios), 3)}}
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
