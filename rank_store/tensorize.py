"""Tensorization: how a token vector of dimension d is reshaped into an order-N tensor.

A balanced factorization keeps the TT cores small and alike: 576 -> (8, 8, 9),
640 -> (8, 8, 10). The factors are returned in ascending order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import TensorShapeError


def _factorizations(d: int, order: int, smallest: int) -> list[tuple[int, ...]]:
    """All non-decreasing tuples of ``order`` factors >= ``smallest`` whose product is d."""
    if order == 1:
        return [(d,)] if d >= smallest else []
    found = []
    f = smallest
    while f ** order <= d:
        if d % f == 0:
            found.extend((f,) + rest for rest in _factorizations(d // f, order - 1, f))
        f += 1
    return found


def balanced_factors(d: int, order: int = 3) -> tuple[int, ...]:
    """The factorization of ``d`` into ``order`` integers that is closest to a cube.

    Balance is measured by the spread max - min, then by the sum of squares
    (which favours equal factors); 576 -> (8, 8, 9). Factors of 1 only appear
    when d has fewer prime factors than ``order``.
    """
    if not isinstance(d, int) or d < 1:
        raise TensorShapeError(f"embedding dimension must be a positive integer, got {d!r}")
    if not isinstance(order, int) or order < 1:
        raise TensorShapeError(f"tensor order must be a positive integer, got {order!r}")
    candidates = _factorizations(d, order, 1)
    return min(candidates, key=lambda f: (max(f) - min(f), sum(x * x for x in f)))


def check_shape(shape: Sequence[int], d: int) -> tuple[int, ...]:
    """Validate an explicit tensor shape for vectors of dimension ``d``; return it as a tuple."""
    shape = tuple(int(n) for n in shape)
    if not shape or any(n < 1 for n in shape):
        raise TensorShapeError(f"tensor shape must be a non-empty list of positive integers, got {shape}")
    if math.prod(shape) != d:
        raise TensorShapeError(
            f"tensor shape {'x'.join(map(str, shape))} has {math.prod(shape)} entries, "
            f"but the vectors have dimension {d}; the factors must multiply to {d} "
            f"(for example {'x'.join(map(str, balanced_factors(d)))})"
        )
    return shape


def resolve_shape(d: int, shape: Sequence[int] | None = None, order: int = 3) -> tuple[int, ...]:
    """``shape`` validated against d, or the balanced factorization of d of the given order."""
    return check_shape(shape, d) if shape is not None else balanced_factors(d, order)
