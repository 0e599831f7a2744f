"""Training noise schedules and the per-generation sigma/timestep plans, as diffusers' schedulers compute them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from sdfast.errors import ConfigError, RequestError
from sdfast.sampling.parametrization import sigma_to_timestep, sigmas_to_timesteps
from sdfast.sampling.samplers import ancestral_step, log_midpoint

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_betas(config: dict) -> np.ndarray:
    """Training betas from a diffusers scheduler config (DDPM, Ho et al. 2020; scaled_linear from latent diffusion)."""
    count = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        return _torch_linspace(start, end, count)
    if kind == "scaled_linear":
        roots = _torch_linspace(start**0.5, end**0.5, count)
        return roots * roots  # float32, as torch.linspace(...) ** 2
    if kind == "squaredcos_cap_v2":
        return _cosine_betas(count)
    raise ConfigError(f"scheduler config: beta_schedule '{kind}' is not supported (linear, scaled_linear, squaredcos_cap_v2)")


def _torch_linspace(start: float, end: float, count: int) -> np.ndarray:
    """torch.linspace(start, end, count, dtype=torch.float32) bit for bit: a float32 step, fused multiply-adds from the
    start for the first half and from the end for the second (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp)."""
    start32, end32 = np.float32(start), np.float32(end)
    if count == 1:
        return np.asarray([start32])
    step = (end32 - start32) / np.float32(count - 1)
    index = np.arange(count, dtype=np.float64)
    from_start = np.float64(start32) + np.float64(step) * index  # exact product, one rounding below: a fused multiply-add
    from_end = np.float64(end32) - np.float64(step) * (count - 1 - index)
    return np.where(index < count // 2, from_start, from_end).astype(np.float32)


def _cosine_betas(count: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, improved DDPM)."""
    def alpha_bar(t: float) -> float:
        return float(np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2)

    betas = [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), max_beta) for i in range(count)]
    return np.asarray(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Zero terminal SNR rescaling (Lin et al. 2023, 'Common Diffusion Noise Schedules and Sample Steps Are Flawed')."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


@dataclass(frozen=True)
class NoiseSchedule:
    """The model's training schedule: cumulative alphas and the matching VE sigmas."""

    alphas_cumprod: np.ndarray  # [T] float32, as torch.cumprod in float32

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        betas = make_betas(config)
        if config.get("rescale_betas_zero_snr"):
            betas = _rescale_zero_terminal_snr(betas)
        # torch.cumprod of float32 accumulates in double, then rounds each partial product to float32
        alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
        return cls(alphas_cumprod=alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float32 as diffusers computes it."""
        ac = self.alphas_cumprod
        return np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)

    def sigma_at(self, alpha_cumprod: float) -> float:
        return float(np.sqrt((1.0 - alpha_cumprod) / alpha_cumprod))

    def sigma_to_timestep(self, sigma: float) -> float:
        """Fractional timestep whose log-sigma interpolates to ``sigma`` (parametrization.sigma_to_timestep)."""
        return sigma_to_timestep(sigma, self.sigmas)


def karras_sigmas(count: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """``count`` descending sigmas spaced as Karras et al. 2022, eq. 5 (diffusers _convert_to_karras), float64."""
    ramp = np.linspace(0, 1, count)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def spaced_timesteps(num_train: int, steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Descending inference timesteps for a diffusers ``timestep_spacing`` (see 'Common Diffusion Noise Schedules', Table 2)."""
    if not 1 <= steps <= num_train:
        raise RequestError(f"steps must be from 1 to the schedule's {num_train} training timesteps, not {steps}")
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + np.float32(steps_offset)
    if spacing == "trailing":
        ratio = num_train / steps
        return np.arange(num_train, 0, -ratio).round().astype(np.float32) - np.float32(1)
    raise ConfigError(f"scheduler config: timestep_spacing '{spacing}' is not one of {', '.join(TIMESTEP_SPACINGS)}")


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampler loop needs, fixed before the first step.

    ``sigmas[i]`` is where step i evaluates the model and ``sigmas[i + 1]`` where it lands; latents live in
    VE form x = x_vp / sqrt(alpha_bar). The loop starts from ``noise * initial_noise_scale`` and hands
    ``x * final_scale`` (back in the model's VP form) to the VAE.
    """

    sigmas: np.ndarray  # [steps + 1] float32
    timesteps: np.ndarray  # [steps] float32, the U-Net's timestep input at each sigmas[i]
    initial_noise_scale: float
    final_scale: float
    # [steps] float32 or None: where diffusers' DDIM lands when it is not sigmas[i + 1] (t - T // steps)
    landing_sigmas: np.ndarray | None = None
    # PLMS only, or None: the sigma diffusers' PNDM takes its warm-up corrector step from when it is not sigmas[0]
    warmup_sigma: float | None = None
    # [steps] float32 or None: where step i evaluates the model between sigmas[i] and sigmas[i + 1] (DPM2's midpoints;
    # 0 for a step with none), and the timesteps diffusers gives the U-Net there
    midpoint_sigmas: np.ndarray | None = None
    midpoint_timesteps: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def starting_at(self, step: int) -> "SamplingPlan":
        """The plan from step ``step`` on, as img2img runs it (diffusers' get_timesteps slices timesteps[step:])."""
        tail = lambda values: None if values is None else values[step:]  # noqa: E731 - per-step arrays all start at step 0
        return replace(
            self, sigmas=self.sigmas[step:], timesteps=self.timesteps[step:], landing_sigmas=tail(self.landing_sigmas),
            midpoint_sigmas=tail(self.midpoint_sigmas), midpoint_timesteps=tail(self.midpoint_timesteps),
        )

    def timestep_for(self, sigma: float, schedule: NoiseSchedule) -> float:
        """The plan's own timestep when ``sigma`` is one of its sigmas or midpoints, else the log-sigma interpolation."""
        matches = np.flatnonzero(self.sigmas[:-1] == np.float32(sigma))
        if matches.size:
            return float(self.timesteps[matches[0]])
        if self.midpoint_sigmas is not None:
            matches = np.flatnonzero(self.midpoint_sigmas == np.float32(sigma))
            if matches.size:
                return float(self.midpoint_timesteps[matches[0]])
        return schedule.sigma_to_timestep(sigma)


def euler_plan(
    config: dict, schedule: NoiseSchedule, steps: int, spacing: str, *, round_karras_timesteps: bool = False
) -> SamplingPlan:
    """Sigmas as diffusers' EulerDiscreteScheduler.set_timesteps makes them (linear interpolation in t, or Karras).

    Euler a, Heun, LMS and KDPM2 make the same ones (KDPM2 rounds its Karras timesteps: ``round_karras_timesteps``).
    """
    timesteps = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, int(config.get("steps_offset", 0)))
    train_sigmas = schedule.sigmas
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)  # [steps] float64
    if config.get("use_karras_sigmas"):
        # diffusers spans the spaced sigmas (not the training ones) unless the config names sigma_min / sigma_max.
        low = config.get("sigma_min") if config.get("sigma_min") is not None else float(sigmas[-1])
        high = config.get("sigma_max") if config.get("sigma_max") is not None else float(sigmas[0])
        sigmas = karras_sigmas(steps, low, high)
        timesteps = sigmas_to_timesteps(sigmas, schedule.sigmas)
        timesteps = timesteps.round() if round_karras_timesteps else timesteps
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    sigma_max = float(sigmas.max())
    # diffusers: init_noise_sigma is sigma_max for linspace/trailing spacing, sqrt(sigma_max^2 + 1) for leading.
    initial = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return SamplingPlan(sigmas=sigmas, timesteps=timesteps.astype(np.float32), initial_noise_scale=initial, final_scale=1.0)


def ddim_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """Integer timesteps and alphas as diffusers' DDIMScheduler uses them, mapped to VE sigmas."""
    num_train = schedule.num_train_timesteps
    timesteps = spaced_timesteps(num_train, steps, spacing, int(config.get("steps_offset", 0)))
    if spacing == "linspace":
        timesteps = timesteps.round()
    timesteps = timesteps.astype(np.int64)
    if timesteps.max() >= num_train or timesteps.min() < 0:
        raise RequestError(f"DDIM with {steps} steps and this model's timestep spacing reaches timestep {timesteps.max()}, outside 0..{num_train - 1}")
    ac = schedule.alphas_cumprod.astype(np.float64)
    final_alpha = 1.0 if config["set_alpha_to_one"] else float(ac[0])
    sigmas = [schedule.sigma_at(ac[t]) for t in timesteps] + [schedule.sigma_at(final_alpha)]
    sigmas = np.asarray(sigmas, dtype=np.float32)
    # diffusers' DDIM always steps to t - T // steps; with linspace spacing that is not the next timestep.
    previous = timesteps - num_train // steps
    landing = np.asarray([schedule.sigma_at(ac[t]) if t >= 0 else schedule.sigma_at(final_alpha) for t in previous], dtype=np.float32)
    landing_sigmas = None if np.array_equal(landing, sigmas[1:]) else landing
    # DDIM starts from unscaled noise in VP form (init_noise_sigma = 1), i.e. noise / sqrt(alpha_bar_0) in VE form.
    return SamplingPlan(
        sigmas=sigmas,
        timesteps=timesteps.astype(np.float32),
        initial_noise_scale=float(np.sqrt(1.0 + float(sigmas[0]) ** 2)),
        final_scale=float(1.0 / np.sqrt(1.0 + float(sigmas[-1]) ** 2)),
        landing_sigmas=landing_sigmas,
    )


def lms_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """LMSDiscreteScheduler's sigmas: Euler's, except that its Karras range ignores the config's sigma_min / sigma_max."""
    return euler_plan({k: v for k, v in config.items() if k not in ("sigma_min", "sigma_max")}, schedule, steps, spacing)


def _with_midpoints(plan: SamplingPlan, schedule: NoiseSchedule, target: Callable[[float, float], float]) -> SamplingPlan:
    """``plan`` plus the log-sigma midpoint between each sigma and ``target(sigma, sigma_next)`` (0 where that is 0), and
    the timesteps diffusers gives the U-Net there."""
    pairs = [(float(s), target(float(s), float(s_next))) for s, s_next in zip(plan.sigmas[:-1], plan.sigmas[1:])]
    midpoints = np.asarray([log_midpoint(s, t) if t > 0 else 0.0 for s, t in pairs], dtype=np.float32)  # [steps]
    # DPM2 a's midpoint is the next sigma itself (eta = 1), but diffusers gives the U-Net the midpoint's own timestep
    # there (unrounded, where Karras full-step timesteps are rounded): one float32 ulp up tells the two apart.
    collides = np.isin(midpoints, plan.sigmas[:-1]) & (midpoints > 0)
    midpoints = np.where(collides, np.nextafter(midpoints, np.float32(np.inf)), midpoints)
    return replace(plan, midpoint_sigmas=midpoints, midpoint_timesteps=sigmas_to_timesteps(midpoints, schedule.sigmas).astype(np.float32))


def dpm2_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """KDPM2DiscreteScheduler: Euler's sigmas (Karras timesteps rounded) and midpoints between consecutive sigmas."""
    plan = euler_plan(config, schedule, steps, spacing, round_karras_timesteps=True)
    return _with_midpoints(plan, schedule, lambda sigma, sigma_next: sigma_next)


def dpm2_ancestral_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """KDPM2AncestralDiscreteScheduler: as dpm2_plan, with midpoints between each sigma and its ancestral sigma_down."""
    plan = euler_plan(config, schedule, steps, spacing, round_karras_timesteps=True)
    return _with_midpoints(plan, schedule, lambda sigma, sigma_next: ancestral_step(sigma, sigma_next)[0])


def pndm_plan(config: dict, schedule: NoiseSchedule, steps: int, spacing: str) -> SamplingPlan:
    """PNDMScheduler with skip_prk_steps (PLMS): its integer timesteps as VE sigmas, and where its fixed T // steps strides land.

    The registry's PLMS sets skip_prk_steps itself; PNDM's Runge-Kutta warm-up (its default) is not implemented.
    """
    num_train = schedule.num_train_timesteps
    timesteps = spaced_timesteps(num_train, steps, spacing, int(config.get("steps_offset", 0)))
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train - 1, steps).round()[::-1]  # PNDM rounds a float64 linspace
    timesteps = timesteps.astype(np.int64)  # [steps] descending
    stride = num_train // steps  # PNDM always steps from t to t - T // steps, and warms up from timesteps[1] + stride
    warmup = int(timesteps[min(1, steps - 1)]) + (stride if steps > 1 else 0)
    highest = max(int(timesteps.max()), warmup)
    if highest >= num_train or timesteps.min() < 0:
        raise RequestError(f"PLMS with {steps} steps and this model's timestep spacing reaches timestep {highest}, outside 0..{num_train - 1}")
    ac = schedule.alphas_cumprod.astype(np.float64)
    final_alpha = 1.0 if config["set_alpha_to_one"] else float(ac[0])

    def sigma(t: int) -> float:
        return schedule.sigma_at(ac[t] if t >= 0 else final_alpha)

    sigmas = np.asarray([sigma(t) for t in timesteps] + [sigma(-1)], dtype=np.float32)
    landing = np.asarray([sigma(t - stride) for t in timesteps], dtype=np.float32)
    warmup_sigma = float(np.float32(sigma(warmup)))
    # PNDM starts from unscaled noise in VP form (init_noise_sigma = 1), as DDIM.
    return SamplingPlan(
        sigmas=sigmas,
        timesteps=timesteps.astype(np.float32),
        initial_noise_scale=float(np.sqrt(1.0 + float(sigmas[0]) ** 2)),
        final_scale=float(1.0 / np.sqrt(1.0 + float(sigmas[-1]) ** 2)),
        landing_sigmas=None if np.array_equal(landing, sigmas[1:]) else landing,
        warmup_sigma=None if warmup_sigma == float(sigmas[0]) else warmup_sigma,
    )
