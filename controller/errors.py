"""Exceptions of the controller package: one base, mixed with the builtin that fits."""
from __future__ import annotations

from tensorslm.errors import ConfigError, TensorSLMError

__all__ = ["ConfigError", "ControllerError", "SensorError"]


class ControllerError(TensorSLMError):
    """Base of every error raised by the controller package (bad config files raise the
    project-wide :class:`tensorslm.errors.ConfigError`)."""


class SensorError(ControllerError, OSError):
    """A power sensor could not be read (a passing fault: callers retry, then fall back)."""
