"""Exceptions of the fleet package: one base, mixed with the builtin that fits."""
from tensorslm.errors import TensorSLMError


class FleetError(TensorSLMError):
    """Base of every error raised by the central side (collector, database, dashboard)."""
