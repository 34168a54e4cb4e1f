"""Errors that carry a message meant for the user (the CLI prints them without a traceback)."""


class UnnoiseError(ValueError):
    """A problem with what the user asked for, explained in words."""


class NonFiniteError(UnnoiseError, FloatingPointError):
    """A denoiser returned NaN or inf."""
