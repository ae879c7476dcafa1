"""Turn the project's library errors into clean CLI errors (no traceback for bad input)."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import click

from tensorslm.errors import TensorSLMError

F = TypeVar("F", bound=Callable)


def library_errors(func: F) -> F:
    """Decorator for click callbacks: any project error becomes ``click.ClickException``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TensorSLMError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
