"""Pure numpy diffusion math: torch-compatible noise, noise schedules, samplers and the denoiser adapter.

Nothing here touches files, engines or devices.
"""
