"""sdfast samplers: every sampler with its A1111 name, diffusers scheduler and the options it sets, for VP and flow models."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


VP_MODELS, FLOW_MODELS = "VP (SD 1.x, SD 2.x, SDXL)", "flow matching (SD3)"


def sampler_table() -> list[dict]:
    from sdfast.sampling.registry import FLOW_SAMPLERS, SAMPLERS

    return [
        {
            "models": models,
            "name": spec.a1111_name,
            "key": spec.key,
            "diffusers": spec.scheduler_class or None,
            "options": dict(spec.config_overrides),
            "stochastic": spec.stochastic,
            "img2img": spec.starts_late,
        }
        for models, table in ((VP_MODELS, SAMPLERS), (FLOW_MODELS, FLOW_SAMPLERS))
        for spec in table.values()
    ]


def run(args: argparse.Namespace) -> int:
    rows = sampler_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("A1111 name", "key", "diffusers scheduler (options)", "noise", "img2img")
    for models in (VP_MODELS, FLOW_MODELS):
        lines = [
            (
                row["name"],
                row["key"],
                (row["diffusers"] or "none (k-diffusion only)") + "".join(f" {k}={v}" for k, v in row["options"].items()),
                "per step" if row["stochastic"] else "initial only",
                "yes" if row["img2img"] else "no",
            )
            for row in rows if row["models"] == models
        ]
        widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
        print(f"{'' if models == VP_MODELS else chr(10)}On {models} models:")
        for line in [header, tuple("-" * w for w in widths), *lines]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
    print("\nNames are case-insensitive: the A1111 name, the key, or a diffusers class name (which picks the sampler its defaults")
    print("give, e.g. DPMSolverMultistepScheduler -> DPM++ 2M). The options shown are the sampler's own; the others come from")
    print("the model's scheduler config as diffusers' from_config reads it: one it leaves out takes the sampler's class's default")
    print("(DDIM clips x0 unless the config says clip_sample=false), whatever class the config is of. On a flow model the same")
    print("names pick its flow samplers (DPM++ 2M and UniPC take the model's shift as flow_shift); the others are refused.")
    return 0
