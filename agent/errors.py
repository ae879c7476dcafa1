"""Exceptions of the agent package: one base, mixed with the builtin that fits."""


class AgentError(Exception):
    """Base of every error raised by the agent package."""
