"""Samplers as data: per-evaluation coefficient tables for the on-device loop (design.md, "Samplers as data").

Each classic sampler moves the latents by a linear combination of the latents it evaluated the model at, the
denoised estimates, and fresh noise, with coefficients that depend only on the schedule. ``tabulate`` reads those
coefficients off the numpy sampler itself, so the table cannot drift from the sampler it stands for:

1. it runs the sampler once on probe vectors: the initial latents are basis vector e_0, the model's j-th answer is
   e_{1+j} and the k-th noise draw is e_{1+M+k}, so every latent the sampler forms is its coefficient vector;
2. it fits, per evaluation j, the recurrence
       S_{j+1} = sum_k a[j,k] S_{j-k} + sum_k b[j,k] D_{j-k} + c[j] n_j      (k < history)
   where S_j is the latent at the j-th model evaluation (S_M is the result) and D_j the model's denoised answer, and
   keeps the shortest history that reproduces the probe exactly;
3. it checks the table against the sampler on random latents with a nonlinear model, which catches anything that is
   not linear in the latents (a clipped x0, a Brownian tree).

Samplers that fail any step get no table, and the runtime keeps their numpy loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sdfast.sampling.parametrization import denoiser_scalings

MAX_HISTORY = 4  # the CUDA kernel's ring of past latents and denoised estimates (LMS and PLMS use 4)
_EXACT = 1e-5  # relative residual of the probe fit
_CHECK_TOLERANCE = 1e-4  # relative difference table vs sampler, on random latents in float32


@dataclass(frozen=True)
class StepTable:
    """Per model evaluation j: where it evaluates, the denoiser scalings there, and the linear update after it."""

    sigmas: np.ndarray  # [M] float32: sigma of evaluation j
    timesteps: np.ndarray  # [M] float32: the U-Net's timestep input at evaluation j
    c_in: np.ndarray  # [M] float32: the U-Net sees c_in * S_j
    c_skip: np.ndarray  # [M] float32: D_j = c_skip * S_j + c_out * (guided U-Net output)
    c_out: np.ndarray  # [M] float32
    x_coeffs: np.ndarray  # [M, history] float32: a[j, k] multiplies S_{j-k}
    d_coeffs: np.ndarray  # [M, history] float32: b[j, k] multiplies D_{j-k}
    noise_coeffs: np.ndarray  # [M] float32: c[j] multiplies noise draw draws[j]
    draws: np.ndarray  # [M] int32: the noise draw used after evaluation j, -1 for none
    final_scale: float  # the result times this is in VP form, for the VAE
    step_ends: np.ndarray  # [steps] int32: how many evaluations are done when sampler step i ends (for progress)

    @property
    def evaluations(self) -> int:
        return len(self.sigmas)

    @property
    def history(self) -> int:
        return self.x_coeffs.shape[1]

    @property
    def noise_draws(self) -> int:
        return int(self.draws.max()) + 1 if len(self.draws) and self.draws.max() >= 0 else 0


def tabulate(run: Callable[..., np.ndarray], timestep_for: Callable[[float], float], prediction_type: str,
             final_scale: float, history: int = MAX_HISTORY) -> StepTable | None:
    """The table of the sampler ``run(model, x, noise, callback) -> x``, or None when it is not a fixed linear recurrence."""
    calls = _probe_counts(run)
    if calls is None:
        return None
    evaluations, draws = calls
    size = 1 + evaluations + draws
    states, sigmas, draw_after, step_ends = [], [], [], []

    def probe_model(x: np.ndarray, sigma: float) -> np.ndarray:
        states.append(np.asarray(x, np.float64).reshape(-1).copy())
        sigmas.append(float(sigma))
        return _basis(size, 1 + len(states) - 1)

    def probe_noise(shape: tuple[int, ...]) -> np.ndarray:
        draw_after.append(len(states) - 1)  # the evaluation this draw follows
        return _basis(size, 1 + evaluations + len(draw_after) - 1)

    result = run(probe_model, _basis(size, 0), probe_noise, lambda i, x: step_ends.append(len(states)))
    states.append(np.asarray(result, np.float64).reshape(-1))
    if len(sigmas) != evaluations or not np.allclose(states[0], _basis(size, 0).reshape(-1)):
        return None  # the first evaluation is not at the initial latents, or the run is not repeatable
    if any(j < 0 for j in draw_after) or len(set(draw_after)) != len(draw_after):
        return None  # noise before the first evaluation, or two draws in one update
    draw_of = dict((j, k) for k, j in enumerate(draw_after))

    for used in range(1, history + 1):
        fitted = _fit(states, evaluations, draw_of, used)
        if fitted is not None:
            break
    else:
        return None
    x_coeffs, d_coeffs, noise_coeffs = fitted
    sigma_array = np.asarray(sigmas, np.float32)
    c_in, c_skip, c_out = (c.astype(np.float32) for c in denoiser_scalings(sigma_array, prediction_type))
    table = StepTable(
        sigmas=sigma_array,
        timesteps=np.asarray([timestep_for(s) for s in sigmas], np.float32),
        c_in=c_in, c_skip=c_skip, c_out=c_out,
        x_coeffs=np.pad(x_coeffs, ((0, 0), (0, history - x_coeffs.shape[1]))).astype(np.float32),
        d_coeffs=np.pad(d_coeffs, ((0, 0), (0, history - d_coeffs.shape[1]))).astype(np.float32),
        noise_coeffs=noise_coeffs.astype(np.float32),
        draws=np.asarray([draw_of.get(j, -1) for j in range(evaluations)], np.int32),
        final_scale=float(final_scale),
        step_ends=np.asarray(step_ends, np.int32),
    )
    return table if _agrees_with_sampler(run, table) else None


def _basis(size: int, index: int) -> np.ndarray:
    vector = np.zeros((1, 1, 1, size), np.float32)  # a [B, C, h, w]-shaped latent, one probe per pixel
    vector[..., index] = 1.0
    return vector


def _probe_counts(run) -> tuple[int, int] | None:
    """(model evaluations, noise draws) of one run, with a model that answers zeros."""
    counts = [0, 0]

    def model(x, sigma):
        counts[0] += 1
        return np.zeros_like(x)

    def noise(shape):
        counts[1] += 1
        return np.zeros(shape, np.float32)

    try:
        run(model, np.zeros((1, 1, 1, 1), np.float32), noise, None)
    except (TypeError, ValueError):
        return None
    return (counts[0], counts[1]) if counts[0] else None


def _fit(states: list[np.ndarray], evaluations: int, draw_of: dict[int, int], used: int):
    """Least-squares coefficients of each update with ``used`` past states and estimates; None unless every fit is exact."""
    size = len(states[0])
    x_coeffs = np.zeros((evaluations, used))
    d_coeffs = np.zeros((evaluations, used))
    noise_coeffs = np.zeros(evaluations)
    for j in range(evaluations):
        past = [k for k in range(used) if j - k >= 0]
        columns = [states[j - k] for k in past] + [_basis(size, 1 + j - k).reshape(-1).astype(np.float64) for k in past]
        if j in draw_of:
            columns.append(_basis(size, 1 + evaluations + draw_of[j]).reshape(-1).astype(np.float64))
        matrix = np.stack(columns, axis=1)  # [P, regressors]
        target = states[j + 1]
        solution, *_ = np.linalg.lstsq(matrix, target, rcond=None)
        if np.abs(matrix @ solution - target).max() > _EXACT * max(1.0, np.abs(target).max()):
            return None
        x_coeffs[j, past] = solution[: len(past)]
        d_coeffs[j, past] = solution[len(past) : 2 * len(past)]
        if j in draw_of:
            noise_coeffs[j] = solution[-1]
    return x_coeffs, d_coeffs, noise_coeffs


def run_table(table: StepTable, x: np.ndarray, denoise: Callable[[np.ndarray, int], np.ndarray], noise: np.ndarray | None) -> np.ndarray:
    """The table's loop in numpy, as the CUDA kernel runs it: ``denoise(S_j, j)`` -> D_j; noise: [draws, ...]. -> S_M."""
    states: list[np.ndarray] = [x]  # newest last
    estimates: list[np.ndarray] = []
    for j in range(table.evaluations):
        estimates.append(denoise(states[-1], j))
        states.append(update(table, j, states, estimates, noise))
        del states[: -table.history], estimates[: -table.history]
    return states[-1]


def update(table: StepTable, j: int, states: list[np.ndarray], estimates: list[np.ndarray], noise: np.ndarray | None) -> np.ndarray:
    """S_{j+1} from the newest-last histories (the kernel's arithmetic: float32, one sum in order k = 0, 1, ...)."""
    result = np.zeros_like(states[-1])
    for k in range(min(table.history, len(states))):
        if table.x_coeffs[j, k]:
            result += table.x_coeffs[j, k] * states[-1 - k]
        if table.d_coeffs[j, k]:
            result += table.d_coeffs[j, k] * estimates[-1 - k]
    if table.draws[j] >= 0:
        result += table.noise_coeffs[j] * noise[table.draws[j]]
    return result


def _agrees_with_sampler(run, table: StepTable) -> bool:
    """The table and the sampler on random latents, with a nonlinear stand-in model and seeded noise."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 4, 4, 4)).astype(np.float32) * table.sigmas[0]
    noise = rng.standard_normal((max(table.noise_draws, 1), 1, 4, 4, 4)).astype(np.float32)

    def model(x, sigma):  # a denoised estimate beyond [-1, 1], so a clipped x0 shows
        return (np.tanh(x / np.float32(sigma + 1.0)) * np.float32(3.0)).astype(np.float32)

    drawn = iter(noise)
    expected = run(model, x0, lambda shape: next(drawn), None)
    got = run_table(table, x0, lambda s, j: model(s, float(table.sigmas[j])), noise)
    scale = max(float(np.abs(expected).max()), 1.0)
    return bool(np.isfinite(got).all() and np.abs(got - expected).max() <= _CHECK_TOLERANCE * scale)


def sampler_table(spec, plan, scheduler_config: dict, prediction_type: str, schedule, eta: float = 0.0) -> StepTable | None:
    """The table of a registry sampler (registry.SamplerSpec) over a plan, or None where it has none (see module doc)."""
    if spec.seeded_tree:
        return None  # DPM++ SDE's noise comes from a Brownian tree per seed, not from draws in order
    options = {"eta": eta} if spec.takes_eta else {}
    config = spec.config_for(scheduler_config)

    def run(model, x, noise, callback):
        model.prediction_type = prediction_type  # PLMS reads it off the model, as off the Denoiser
        return spec.run(model, x, plan, callback, scheduler_config=config, noise=noise, **options)

    return tabulate(run, lambda sigma: plan.timestep_for(sigma, schedule), prediction_type, plan.final_scale)
