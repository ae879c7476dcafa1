"""Exceptions of the controller package: one base, mixed with the builtin that fits."""
from __future__ import annotations


class ControllerError(Exception):
    """Base of every error raised by the controller package."""


class ConfigError(ControllerError, ValueError):
    """A configuration file is malformed. Carries the file, the line and the field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.reason = message
        where = file or "<config>"
        if line is not None:
            where += f", line {line}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class SensorError(ControllerError, OSError):
    """A power sensor could not be read (a passing fault: callers retry, then fall back)."""
