"""Every sampler's final latents against its reference, on the tests' stand-in model: max relative error per step count.

    python benchmarks/sampler_parity.py [--steps 1 4 20 50] [--json benchmarks/results/sampler_parity.json]

The reference is the diffusers scheduler the sampler maps to (run unmodified, DPM++ SDE with noise_sampler_seed set
to the seed on both sides) or, for DPM++ 2S a which diffusers lacks, a torch transcription of k-diffusion's
sample_dpmpp_2s_ancestral. Epsilon prediction, the SD 1.5 scheduler config and its default spacing, seed 3.
The error is max |sdfast - reference| / max |reference|. The tests assert the same at 1e-5 over more cases.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdfast.sampling.registry import SAMPLERS  # noqa: E402
from tests.sampler_harness import SD15_SCHEDULER, relative_error, run_diffusers, run_sdfast  # noqa: E402

SEED = 3


def measure(key: str, steps: int) -> tuple[float, str]:
    spec = SAMPLERS[key]
    config = dict(SD15_SCHEDULER)
    if spec.seeded_tree:
        config["noise_sampler_seed"] = SEED
    ours = run_sdfast(key, config, steps, seed=SEED, prediction_type="epsilon")
    if spec.scheduler_class:
        reference = run_diffusers(spec.scheduler_class, spec.config_for(config), steps, seed=SEED, prediction_type="epsilon")
        return relative_error(ours, reference), f"diffusers {spec.scheduler_class}"
    from tests.test_samplers import k_diffusion_dpmpp_2s_ancestral

    reference = k_diffusion_dpmpp_2s_ancestral(spec.config_for(config), steps, SEED, "epsilon")
    return relative_error(ours, reference), "k-diffusion sample_dpmpp_2s_ancestral (torch transcription)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 20, 50])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print(f"{'sampler':<22}{'reference':<44}" + "".join(f"{f'{n} steps':>12}" for n in args.steps))
    for key, spec in SAMPLERS.items():
        errors, reference = {}, ""
        for steps in args.steps:
            errors[steps], reference = measure(key, steps)
        rows.append({"key": key, "name": spec.a1111_name, "reference": reference, "max_rel_error": {str(k): v for k, v in errors.items()}})
        print(f"{spec.a1111_name:<22}{reference[:43]:<44}" + "".join(f"{errors[n]:>12.1e}" for n in args.steps), flush=True)
    if args.json:
        import diffusers
        import torch

        args.json.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "python": platform.python_version(),
            "diffusers": diffusers.__version__, "torch": torch.__version__,
            "seed": SEED, "prediction_type": "epsilon", "scheduler_config": SD15_SCHEDULER,
            "samplers": rows,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
