"""Errors a user can act on. The CLI prints them as one line and exits 2; anything else is a bug."""


class SdfastError(Exception):
    """A problem with the user's input, files or request, described in one line."""


class ConfigError(SdfastError):
    """A model, scheduler or recipe configuration that sdfast cannot use."""


class EngineError(SdfastError):
    """An engine dir that is missing, corrupt, of another format, or not built for the request."""


class RequestError(SdfastError):
    """A generation request that the engine cannot serve (size, batch, sampler, prompt, output path)."""


class ExportError(SdfastError):
    """An export that cannot start or that failed its parity check."""


class StopSampling(Exception):
    """Raised by a step callback to end sampling between steps; the pipeline decodes the latents reached so far (A1111's interrupt).

    Not an SdfastError: it is a control signal, not a failure. A loop that catches it on the way out may set ``latents``
    to its latest denoised estimate (x0, [B, C, h, w]) so the caller can decode it.
    """

    def __init__(self, reason: str = "interrupted"):
        super().__init__(reason)
        self.reason = reason
        self.latents = None  # x0 estimate of the last step that ran, set by the loop that stopped
        self.steps_run = 0  # sampler steps completed before the stop (not U-Net evaluations), set by the loop that stopped
