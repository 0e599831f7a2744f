"""Guidance truncation: classifier-free guidance (Ho and Salimans 2022) on the first steps only.

As diffusers' documented dynamic-CFG callback does (callback_on_step_end setting guidance_scale to 0 and keeping the
prompt's half of the embeddings at step int(steps x fraction)): the evaluations after that step run the cond-only
U-Net (``unet_cond``, exported with ``--guidance-truncation`` over the guided U-Net's weights) on the prompt's rows, at
about half a guided step's cost. The same graph runs every step of a request with cfg <= 1, which needs no
unconditional rows at all.
"""
from __future__ import annotations

import numpy as np

from sdfast.errors import RequestError

COND = "unet_cond"  # the cond-only U-Net's component (role denoiser_cond)


def check_request(request, manifest, evaluates_twice: bool, backend: str) -> None:
    """RequestError for a guidance stop this engine dir or request cannot run."""
    stop = request.guidance_stop
    if stop is None:
        return
    if isinstance(stop, bool) or not isinstance(stop, (int, float)) or not 0.0 <= stop <= 1.0:
        raise RequestError(f"guidance stop must be a fraction of the steps from 0 to 1, not {stop!r}")
    if COND not in manifest.components:
        raise RequestError("this engine dir has no cond-only U-Net for guidance truncation: export it with "
                           "sdfast export --guidance-truncation")
    for asked, why in ((request.step_cache not in (None, 1), "step caching"), (bool(request.control), "ControlNets"),
                       (request.refiner_switch is not None, "a refiner hand-off"), (evaluates_twice, "a sampler that evaluates twice per step"),
                       (request.skip_layer_guidance is not None, "skip-layer guidance"),
                       (backend != "cpu", f"the {backend} backend (it would hold a second U-Net on the device)")):
        if asked:
            raise RequestError(f"guidance truncation does not run with {why} yet")


def last_guided_evaluation(steps: int, stop: float | None) -> int | None:
    """The last evaluation that keeps guidance: int(steps x stop), as diffusers' callback cuts after that step; None:
    every evaluation is guided."""
    return None if stop is None or stop >= 1.0 else int(steps * stop)


def cond_rows(conditioning: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The prompt's rows of the guided conditioning (unconditional rows first, runtime.families.base.guided_rows)."""
    return {name: conditioning[name][len(conditioning[name]) // 2:] for name in names}
