"""The project's one base exception, and the configuration error every package shares.

Each package derives its own base from :class:`TensorSLMError` (``RankStoreError``,
``ControllerError``, ``AgentError``, ``FleetError``), mixed with the builtin that fits, so a
caller can catch everything of ours with one ``except`` and nothing of anyone else's."""
from __future__ import annotations


class TensorSLMError(Exception):
    """Base of every error raised by tensorslm."""


class ConfigError(TensorSLMError, ValueError):
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
