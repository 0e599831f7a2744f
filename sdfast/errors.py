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
