"""Multistep and solver samplers as diffusers' DPM-Solver++, UniPC and LCM schedulers run them, in VE form.

Same conventions as samplers.py: ``model(x, sigma)`` is D(x; sigma) for latents x = x_vp / sqrt(alpha_bar), and
``callback(i, x)`` is told after every step. In VE form the log-SNR time of DPM-Solver and UniPC is
lambda = -log(sigma), so exp(-h) over a step is sigma_next / sigma, and diffusers' VP updates divided by alpha_t
become the updates below.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from sdfast.sampling.samplers import Callback, Model, NoiseSource, after_step, ancestral_step, to_d

f32 = np.float32


def sample_dpmpp_2m(
    model: Model, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None, *, solver_type: str = "midpoint"
) -> np.ndarray:
    """DPM-Solver++(2M), multistep second order on the data prediction (Lu et al. 2022, 'DPM-Solver++', Alg. 2).

    The first and the last step (to sigma 0) are first order, as diffusers' lower_order_final; ``solver_type`` "heun"
    is diffusers' alternative second-order term.
    """
    old_denoised, h_last = None, 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)  # [B, C, h, w]
        ratio = sigma_next / sigma  # exp(-h)
        h = math.log(sigma / sigma_next) if sigma_next else math.inf
        if old_denoised is None or sigma_next == 0:
            x = x * f32(ratio) + denoised * f32(1 - ratio)
        else:
            d1 = (denoised - old_denoised) * f32(h / h_last)  # D1 = (m0 - m1) / r0, r0 = h_last / h
            if solver_type == "heun":
                x = x * f32(ratio) + denoised * f32(1 - ratio) + d1 * f32((ratio - 1) / h + 1)
            else:
                x = x * f32(ratio) + (denoised + d1 * f32(0.5)) * f32(1 - ratio)
        old_denoised, h_last = denoised, h
        x = after_step(callback, i, x)
    return x


def sample_dpmpp_2m_sde(
    model: Model, x: np.ndarray, sigmas: np.ndarray, callback: Callback = None, *, noise: NoiseSource, solver_type: str = "midpoint"
) -> np.ndarray:
    """SDE-DPM-Solver++(2M): DPM-Solver++(2M) on the diffusion SDE, fresh noise every step (Lu et al. 2022, 'DPM-Solver++', App. B).

    Noise is drawn at every step, the last included, as diffusers draws it; first and last steps are first order.
    """
    old_denoised, h_last = None, 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)  # [B, C, h, w]
        fresh = noise(x.shape)
        decay = (sigma_next / sigma) ** 2  # exp(-2h)
        h = math.log(sigma / sigma_next) if sigma_next else math.inf
        if old_denoised is None or sigma_next == 0:
            x = x * f32(decay) + denoised * f32(1 - decay)
        else:
            d1 = (denoised - old_denoised) * f32(h / h_last)  # D1 = (m0 - m1) / r0, r0 = h_last / h
            if solver_type == "heun":
                x = x * f32(decay) + denoised * f32(1 - decay) + d1 * f32((1 - decay) / (-2 * h) + 1)
            else:
                x = x * f32(decay) + (denoised + d1 * f32(0.5)) * f32(1 - decay)
        x = x + fresh * f32(sigma_next * math.sqrt(1 - decay))
        old_denoised, h_last = denoised, h
        x = after_step(callback, i, x)
    return x


def _t_of(sigma: float) -> np.float32:
    """t = -log(sigma) in float32, correctly rounded (diffusers' DPMSolverSDEScheduler: torch float32 log)."""
    return f32(-f32(math.log(float(sigma))))


def _sigma_of(t: np.float32) -> np.float32:
    """sigma = exp(-t) in float32, correctly rounded (torch float32 exp)."""
    return f32(math.exp(-float(t)))


def _sde_times(sigma: float, sigma_next: float) -> tuple[np.float32, np.float32, np.float32]:
    """t, the log-sigma midpoint t_mid, and t_next, for t = -log(sigma), in DPMSolverSDEScheduler's float32 arithmetic."""
    t, t_next = _t_of(sigma), _t_of(sigma_next)
    return t, f32(t + f32(t_next - t) * f32(0.5)), t_next


def sde_midpoint(sigma: float, sigma_next: float) -> np.float32:
    """The sigma where sample_dpmpp_sde evaluates the model between ``sigma`` and ``sigma_next``."""
    return _sigma_of(_sde_times(sigma, sigma_next)[1])


def _sde_half_step(x: np.ndarray, denoised: np.ndarray, t: np.float32, t_to: np.float32, noise_sampler, s_noise: float) -> np.ndarray:
    """An ancestral DPM-Solver++(1) step from exp(-t) to exp(-t_to): deterministic to sigma_down, then Brownian noise of sigma_up."""
    sigma_from, sigma_to = _sigma_of(t), _sigma_of(t_to)
    sigma_down, sigma_up = ancestral_step(float(sigma_from), float(sigma_to))
    ratio = sigma_down / float(sigma_from)  # exp(-(t_down - t))
    x = x * f32(ratio) + denoised * f32(1 - ratio)
    return x + noise_sampler(sigma_from, sigma_to) * f32(s_noise * sigma_up)


def sample_dpmpp_sde(
    model: Model,
    x: np.ndarray,
    sigmas: np.ndarray,
    callback: Callback = None,
    *,
    noise_sampler: Callable[[float, float], np.ndarray],
    s_noise: float = 1.0,
) -> np.ndarray:
    """DPM-Solver++(2S) on the SDE with Brownian-tree noise (Lu et al. 2022, 'DPM-Solver++'; k-diffusion sample_dpmpp_sde, r = 1/2).

    Each interval takes an ancestral half step to the log-sigma midpoint, evaluates the model there, and redoes the
    ancestral step from the start with the midpoint's data prediction; the last step (to sigma 0) is Euler's. Times
    t = -log(sigma) are rounded to float32 as diffusers' DPMSolverSDEScheduler rounds them, so that
    ``noise_sampler(sigma, sigma_next)`` (unit-variance noise, e.g. brownian.BrownianTreeNoiseSampler) is asked at
    the same points of its Brownian path. (torch's float32 exp and log, MKL's on x86, are not always correctly
    rounded: about 0.2% of query times land across the tree's 1e-6 grid from diffusers', changing that step's noise.)
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, float(sigma))  # [B, C, h, w]
        if sigma_next == 0:
            x = x + to_d(x, float(sigma), denoised) * -sigma
        else:
            t, t_mid, t_next = _sde_times(sigma, sigma_next)
            x_mid = _sde_half_step(x, denoised, t, t_mid, noise_sampler, s_noise)
            denoised_mid = model(x_mid, float(_sigma_of(t_mid)))
            x = _sde_half_step(x, denoised_mid, t, t_next, noise_sampler, s_noise)
        x = after_step(callback, i, x)
    return x


def _lambda(sigma: float) -> float:
    """Log-SNR time in VE form, lambda = log(alpha / sigma_vp) = -log(sigma); infinite at sigma 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _unipc_update(
    x: np.ndarray,
    lambda_to: float,
    history: Sequence[tuple[float, np.ndarray]],
    variant: str,
    denoised_to: np.ndarray | None = None,
) -> np.ndarray:
    """UniP (``denoised_to`` None) or UniC from history[-1]'s time to ``lambda_to``, of order len(history) (Zhao et al. 2023, Alg. 1-2).

    ``history`` holds (lambda, data prediction) pairs, oldest first; UniC also uses the prediction at the target.
    B(h) is hh for "bh1" and expm1(hh) for "bh2", hh = -(lambda_to - lambda_0) in the data-prediction form.
    """
    lambda_0, m0 = history[-1]
    h = lambda_to - lambda_0
    rks = [(lam - lambda_0) / h for lam, _ in reversed(history[:-1])] + [1.0]
    d1s = [(d - m0) * f32(1 / rk) for rk, (_, d) in zip(rks, reversed(history[:-1]))]  # each [B, C, h, w]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = np.array([[rk ** j for rk in rks] for j in range(len(rks))])  # R[j, k] = r_k ** j
    x = x * f32(math.exp(hh)) - m0 * f32(h_phi_1)
    if denoised_to is None:
        rhos = [] if len(rks) == 1 else [0.5] if len(rks) == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
        terms = d1s
    else:
        rhos = [0.5] if len(rks) == 1 else np.linalg.solve(r, np.array(b))
        terms = d1s + [denoised_to - m0]
    if len(terms) and len(rhos):  # (diffusers multiplies an infinite bh1 B(h) by a zero sum at sigma 0: NaN)
        x = x - sum(term * f32(rho) for rho, term in zip(rhos, terms)) * f32(b_h)
    return x


def sample_unipc(
    model: Model,
    x: np.ndarray,
    sigmas: np.ndarray,
    callback: Callback = None,
    *,
    order: int = 2,
    variant: str = "bh2",
    disable_corrector: Sequence[int] = (),
) -> np.ndarray:
    """UniPC: a multistep predictor (UniP) plus a corrector (UniC) that reuses each new model evaluation (Zhao et al. 2023, 'UniPC').

    Data-prediction form (diffusers' predict_x0). The corrector refines x at step i with D(x_i) before step i
    predicts onwards (except after steps in ``disable_corrector``); orders ramp up from 1 and down again over the
    last steps (diffusers' lower_order_final, without which the step to sigma 0 is not finite).
    """
    steps = len(sigmas) - 1
    history: list[tuple[float, np.ndarray]] = []  # (lambda, D) of the last ``order`` steps, oldest first
    x_last, last_order = None, 0
    for i in range(steps):
        lambda_i = _lambda(float(sigmas[i]))
        denoised = model(x, float(sigmas[i]))  # [B, C, h, w]
        if x_last is not None and i - 1 not in disable_corrector:
            x = _unipc_update(x_last, lambda_i, history[-last_order:], variant, denoised_to=denoised)
        history = (history + [(lambda_i, denoised)])[-order:]
        this_order = min(order, steps - i, i + 1)
        x_last, last_order = x, this_order
        x = _unipc_update(x, _lambda(float(sigmas[i + 1])), history[-this_order:], variant)
        x = after_step(callback, i, x)
    return x


def sample_lcm(
    model: Model,
    x: np.ndarray,
    sigmas: np.ndarray,
    callback: Callback = None,
    *,
    noise: NoiseSource,
    c_skip: np.ndarray,
    c_out: np.ndarray,
    clip_denoised: float | None = None,
) -> np.ndarray:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, 'Latent Consistency Models', Alg. 3).

    Step i evaluates the consistency function f(x, t_i) = c_skip[i] * x_vp + c_out[i] * x0 (its boundary-condition
    scalings) and, except after the last step, noises that estimate afresh to sigmas[i + 1].
    ``clip_denoised`` clamps x0 first, as diffusers' clip_sample.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)  # x0 estimate, [B, C, h, w]
        if clip_denoised is not None:
            denoised = np.clip(denoised, -clip_denoised, clip_denoised)
        x_vp = x * f32(1 / math.sqrt(1 + sigma**2))
        x = x_vp * f32(c_skip[i]) + denoised * f32(c_out[i])
        if i < len(sigmas) - 2:
            x = x + noise(x.shape) * f32(sigma_next)
        x = after_step(callback, i, x)
    return x
