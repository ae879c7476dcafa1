"""Exceptions of the agent package: one base, mixed with the builtin that fits."""
from tensorslm.errors import TensorSLMError


class AgentError(TensorSLMError):
    """Base of every error raised by the agent package."""
