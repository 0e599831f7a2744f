"""How much memory N sessions of one graph take: separate sessions, or sessions sharing its initializers.

    python benchmarks/shared_weights_probe.py GRAPH.onnx [--sessions 3] --mode separate|separate-noprepack|shared|shared-noprepack

The design question for several image sizes per engine dir: per-size static graphs over one copy of the weights.
``shared`` hands every session the same arrays (numpy memmaps of the graph's data file) through
SessionOptions.add_initializer; ``shared-noprepack`` also turns off onnxruntime's weight prepacking (its packed MatMul
copies are per session); ``separate-noprepack`` turns prepacking off but lets each session read the data file itself.
Prints the process RSS after each session is created (before any run). Run each mode in its
own process. Needs onnx (the heavy side) to list the external initializers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def rss_gib() -> float:
    from sdfast.bench.measure import rss_mib

    return rss_mib() / 1024


def shared_initializers(graph: Path) -> list[tuple[str, object]]:
    """(name, OrtValue over a memmap of the data file) for every external initializer of ``graph``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(graph), load_external_data=False)
    found = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            external = {entry.key: entry.value for entry in init.external_data}
            array = np.memmap(graph.parent / external["location"], dtype=onnx.helper.tensor_dtype_to_np_dtype(init.data_type),
                              mode="r", offset=int(external.get("offset", 0)), shape=tuple(init.dims))
            found.append((init.name, ort.OrtValue.ortvalue_from_numpy(np.asarray(array))))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--mode", choices=("separate", "separate-noprepack", "shared", "shared-noprepack"), required=True)
    parser.add_argument("--run", action="store_true", help="also run each session once (zeros; 77 tokens) and print the RSS after")
    args = parser.parse_args()

    import onnxruntime as ort

    shared = shared_initializers(args.graph) if args.mode.startswith("shared") else []
    sessions = []
    for index in range(args.sessions):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the CPU variant is saved optimized
        options.log_severity_level = 3
        if args.mode.endswith("noprepack"):
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in shared:
            options.add_initializer(name, value)
        sessions.append(ort.InferenceSession(str(args.graph), options, providers=["CPUExecutionProvider"]))
        print(f"{args.mode}: {index + 1} session(s), RSS {rss_gib():.2f} GiB", flush=True)
    if args.run:  # the weights a call touches are in the RSS afterwards: shared pages count once
        for index, session in enumerate(sessions):
            feeds = {i.name: np.zeros([d if isinstance(d, int) else 77 for d in i.shape], dtype=np.float32) for i in session.get_inputs()}
            session.run(None, feeds)
            print(f"{args.mode}: after running {index + 1} session(s), RSS {rss_gib():.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
