"""Turn the project's library errors into clean CLI errors (no traceback for bad input)."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import click

from agent.errors import AgentError
from controller.errors import ControllerError
from rank_store.errors import RankStoreError

F = TypeVar("F", bound=Callable)

PROJECT_ERRORS = (RankStoreError, ControllerError, AgentError)


def library_errors(func: F) -> F:
    """Decorator for click callbacks: a project error becomes ``click.ClickException``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PROJECT_ERRORS as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
