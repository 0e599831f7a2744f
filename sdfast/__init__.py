"""sdfast: a lean, fast Stable Diffusion inference runtime."""

__version__ = "0.1.0"
