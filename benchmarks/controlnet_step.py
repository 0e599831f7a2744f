"""The step cost of ControlNet on the CPU: sdfast's U-Net step with zero, one and two ControlNets (and, optionally, the
U-Net exported without residual inputs), against diffusers' ControlNet step on the same weights, alternating in one run.

    python benchmarks/controlnet_step.py --engine ENGINE [--plain-engine ENGINE2] [--diffusers] [--rounds 3 --calls 2]

ENGINE has two ControlNets (sdfast export-controlnet ... --name canny / --name depth). A step is what one sampler
step runs with guidance: the ControlNets' calls, their residuals scaled and summed (sdfast: ControlNets.residuals,
as generate runs it), then the U-Net call, all at the engine's batch (2 with guidance). diffusers runs
UNet2DConditionModel and ControlNetModel (MultiControlNet's sum for two) in fp32 on torch's CPU, loaded from the
folders the engine dir's manifest names. Inputs are seeded random latents, timestep 500 and random text embeddings.
Writes a JSON of every sample and prints a Markdown table: median (min to max) ms, and each row against sdfast's plain step.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def sdfast_steps(engine_dir: Path, plain_dir: Path | None, rng, max_controlnets: int = 2) -> tuple[dict, dict]:
    from sdfast.runtime.backends import get_backend
    from sdfast.runtime.control import ControlUnit
    from sdfast.runtime.controlnets import ControlNets
    from sdfast.runtime.manifest import read_manifest

    backend = get_backend("cpu")
    manifest = read_manifest(engine_dir)
    info = manifest.components[manifest.denoiser]
    unet = backend.load(info, manifest.path(info.file))
    controlnets = ControlNets(manifest, backend, verify="size")
    names = controlnets.names[:2]
    for name in names:
        controlnets.engine(name)  # loaded before timing
    geometry = manifest.geometry
    rows, height, width = geometry["unet_batch"], geometry["height"], geometry["width"]
    conditioning = {"encoder_hidden_states": rng.standard_normal((rows, geometry["text_length"], info.input("encoder_hidden_states").shape[2]),
                                                                 dtype=np.float32)}  # [2B, 77, 768]
    sample = rng.standard_normal((rows, *info.input("sample").shape[1:]), dtype=np.float32)  # [2B, 4, H/8, W/8]
    timesteps = np.full(rows, 500.0, np.float32)
    zeros = {spec.name: np.zeros(spec.shape, np.float32) for spec in info.inputs if spec.name not in ("sample", "timestep", *conditioning)}
    units = [ControlUnit(name, rng.uniform(0, 1, (1, 3, height, width)).astype(np.float32)) for name in names]

    def step(count: int):
        def run():
            residuals = controlnets.residuals(tuple(units[:count]), conditioning, sample, timesteps, 0, 1, True) if count else None
            return unet.run({**conditioning, **zeros, **(residuals or {}), "sample": sample, "timestep": timesteps})
        return run

    steps = {"sdfast U-Net (zero residuals)": step(0)}
    for count in range(1, min(max_controlnets, len(names)) + 1):
        steps[f"sdfast + {count} ControlNet{'s' if count > 1 else ''}"] = step(count)
    if plain_dir is not None:
        plain = read_manifest(plain_dir)
        plain_info = plain.components[plain.denoiser]
        plain_unet = backend.load(plain_info, plain.path(plain_info.file))
        steps["sdfast U-Net without residual inputs"] = lambda: plain_unet.run({**conditioning, "sample": sample, "timestep": timesteps})
    shared = {"conditioning": conditioning, "sample": sample, "units": units, "manifest": manifest, "names": names}
    return steps, shared


def diffusers_steps(shared: dict) -> dict:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.set_grad_enabled(False)
    manifest = shared["manifest"]
    unet = UNet2DConditionModel.from_pretrained(Path(manifest.data["source"]["path"]) / "unet").eval()
    nets = [ControlNetModel.from_pretrained(manifest.data["components"][f"controlnet_{name}"]["controlnet"]["source"]["path"]).eval()
            for name in shared["names"]]
    hidden = torch.from_numpy(shared["conditioning"]["encoder_hidden_states"])
    sample, t = torch.from_numpy(shared["sample"]), torch.tensor(500.0)
    images = [torch.from_numpy(np.repeat(unit.image, sample.shape[0], axis=0)) for unit in shared["units"]]

    def step(count: int):
        def run():
            down, mid = None, None
            for net, image in zip(nets[:count], images):  # MultiControlNetModel's sum
                d, m = net(sample, t, encoder_hidden_states=hidden, controlnet_cond=image, conditioning_scale=1.0, return_dict=False)
                down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid} if count else {}
            return unet(sample, t, encoder_hidden_states=hidden, **extra, return_dict=False)[0]
        return run

    return {"diffusers U-Net": step(0), "diffusers + 1 ControlNet": step(1), "diffusers + 2 ControlNets": step(2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--plain-engine", type=Path, help="the same model exported with --no-controlnet-inputs")
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers' ControlNet step on the same weights")
    parser.add_argument("--controlnets", type=int, default=2, help="time steps with 1 .. this many ControlNets (0: the U-Nets only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="calls per system per round")
    parser.add_argument("--out", type=Path, help="JSON of every sample")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    steps, shared = sdfast_steps(args.engine, args.plain_engine, rng, args.controlnets)
    if args.diffusers:
        steps.update(diffusers_steps(shared))
    for name, run in steps.items():  # warm-up: first calls allocate and prepack
        print(f"warming up {name}", file=sys.stderr)
        run()
    samples = {name: [] for name in steps}
    for round_index in range(args.rounds):
        for name, run in steps.items():
            for _ in range(args.calls):
                started = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - started) * 1e3)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{n} {statistics.median(s[-args.calls:]):.0f}" for n, s in samples.items()),
              file=sys.stderr)
    base = statistics.median(samples["sdfast U-Net (zero residuals)"])
    geometry = shared["manifest"].geometry
    print(f"\n{geometry['width']}x{geometry['height']}, batch {geometry['unet_batch']}, {args.rounds} rounds x {args.calls} calls, "
          f"alternating; {platform.processor() or platform.machine()}\n")
    print("| step | median ms (min to max) | vs sdfast plain step |\n|---|---:|---:|")
    for name, values in samples.items():
        print(f"| {name} | {statistics.median(values):.0f} ({min(values):.0f} to {max(values):.0f}) | {statistics.median(values) / base:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                        "geometry": geometry, "samples_ms": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
