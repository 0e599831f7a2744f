"""The cost of switching LoRAs at run time, against loading the engine dir: sdfast merges a LoRA into the stored
weights in numpy and re-creates the U-Net's and text encoders' sessions (initializer overrides); no re-export.

    python benchmarks/lora_switch.py --engine ENGINE [--rank 32] [--locon] [--rounds 3]

Two random LoRAs of kohya's default layout (every attention, feed-forward and proj layer of the U-Net's
transformers, every text-encoder linear; --locon adds the resnet convolutions) are written for the engine's weights
(names and shapes from its parameter maps: no torch). Each round, alternating: a full Pipeline.load (sha256
verification off, as a warm server restart would be: --verify size), then switches none -> A -> B -> A+B -> none,
each timed (merge and sessions, what the pipeline does before its first step). Prints a Markdown table and writes JSON
with every sample, the RSS after each switch, and the machine.
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

LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",  # U-Net transformers
                "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # CLIP
LOCON_MODULES = ("conv1", "conv2", "conv_shortcut")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def rss_gib() -> float:
    from sdfast.bench.measure import rss_mib

    return rss_mib() / 1024


def write_lora(path: Path, shapes: dict[str, tuple], rank: int, locon: bool, seed: int, sdxl: bool) -> int:
    """A kohya-named LoRA (fp16, as they are shared) for the targets; returns the number of weights it changes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    modules = LORA_MODULES + (LOCON_MODULES if locon else ())
    tensors = {}
    for target, shape in shapes.items():
        component, module = target.removesuffix(".weight").split(".", 1)
        if not any(module == m or module.endswith("." + m) for m in modules) or (len(shape) == 4 and shape[2:] != (1, 1) and not locon):
            continue
        prefix = KOHYA_PREFIX[component] if sdxl or component != "text_encoder" else "lora_te_"
        stem = prefix + module.replace(".", "_")
        kernel = tuple(shape[2:])
        tensors[f"{stem}.lora_down.weight"] = (rng.standard_normal((rank, shape[1], *kernel)) * 0.01).astype(np.float16)
        tensors[f"{stem}.lora_up.weight"] = (rng.standard_normal((shape[0], rank, *((1, 1) if kernel else ()))) * 0.01).astype(np.float16)
        tensors[f"{stem}.alpha"] = np.asarray(rank, dtype=np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--locon", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from sdfast.runtime.lora.library import LoraLibrary
    from sdfast.runtime.lora.prompt_tags import LoraUse
    from sdfast.runtime.pipeline import Pipeline

    scratch = tempfile.TemporaryDirectory(prefix="sdfast-loras-")  # the LoRA files go when the run ends
    folder = Path(scratch.name)
    pipeline = Pipeline.load(args.engine, verify="size")
    shapes = pipeline.loras.shapes()
    sdxl = "text_encoder_2" in pipeline.engines
    changed = {name: write_lora(folder / f"{name}.safetensors", shapes, args.rank, args.locon, seed, sdxl) for seed, name in enumerate("AB")}
    sizes = {name: (folder / f"{name}.safetensors").stat().st_size for name in "AB"}
    print(f"LoRAs of rank {args.rank}{' with LoCon' if args.locon else ''}: {changed} weights, "
          f"{', '.join(f'{n} {s / 2**20:.0f} MiB' for n, s in sizes.items())}; weights loaded {rss_gib():.2f} GiB RSS", flush=True)
    del pipeline
    switches = {"none -> A": [LoraUse("A")], "A -> B": [LoraUse("B")], "B -> A+B": [LoraUse("A"), LoraUse("B", 0.5, 0.5)],
                "A+B -> none": []}
    samples: dict[str, list[float]] = {"full load (verify size)": [], **{k: [] for k in switches}}
    rss: dict[str, list[float]] = {k: [] for k in samples}
    for round_index in range(args.rounds):
        started = time.perf_counter()
        pipeline = Pipeline.load(args.engine, verify="size")
        samples["full load (verify size)"].append(time.perf_counter() - started)
        rss["full load (verify size)"].append(rss_gib())
        pipeline.loras.library = LoraLibrary(folder)
        for label, uses in switches.items():
            pipeline.loras.library._read.clear()  # the file read and parsed inside the timing, as a first use is
            started = time.perf_counter()
            pipeline.loras.check(uses)
            pipeline.loras.apply(uses)
            samples[label].append(time.perf_counter() - started)
            rss[label].append(rss_gib())
        del pipeline
        print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in samples.items()), flush=True)
    load = statistics.median(samples["full load (verify size)"])
    print("\n| step | median s | min | max | / full load | RSS after, GiB |\n|---|---|---|---|---|---|")
    for label, values in samples.items():
        print(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} | "
              f"{statistics.median(values) / load:.2f} | {max(rss[label]):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "engine": str(args.engine), "rank": args.rank, "locon": args.locon, "weights_changed": changed, "lora_bytes": sizes,
            "samples_s": samples, "rss_gib": rss, "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
            "command": "python benchmarks/lora_switch.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False)),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
