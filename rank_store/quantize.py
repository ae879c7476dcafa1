"""Quantization baselines for an embedding table: fp32, fp16, and per-row symmetric int8 and int4.

Each baseline is an order-1 rung (:mod:`tensorslm.rank_store.recipes`: ``row``, ``row+fp16``,
``row+int8``, ``row+int4``), so its bytes are :attr:`~tensorslm.rank_store.rung.Rung.nbytes` (int4
codes packed two per byte, one fp16 scale per row, all counted) and its rows are rebuilt by
:func:`~tensorslm.rank_store.rung.reconstruct_rows` from the fp16-rounded scales actually stored,
exactly as a served rung would be.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import EvaluationError
from .recipes import build
from .rung import Rung, reconstruct_rows

log = logging.getLogger(__name__)

#: baseline name -> the order-1 recipe that stores it
BASELINE_RECIPES = {"fp32": "row", "fp16": "row+fp16", "int8": "row+int8", "int4": "row+int4"}
BASELINES = tuple(BASELINE_RECIPES)


@dataclass(frozen=True)
class QuantizedTable:
    """A baseline (V, d) table stored as the order-1 ``rung`` of the recipe of its ``name``."""

    name: str
    rung: Rung

    @property
    def codes(self) -> torch.Tensor:
        """As stored: fp32/fp16 (V, d), int8 (V, d), or uint8 (V, ceil(d/2)) for int4."""
        core = self.rung.groups[0].cores[0]  # (V, 1, d or ceil(d/2), 1)
        return core.reshape(core.shape[0], -1)

    @property
    def scales(self) -> torch.Tensor | None:
        """(V,) fp16, one per row, for int8 and int4; None for fp32 and fp16."""
        scales = self.rung.groups[0].scales
        return None if scales is None else scales[0]

    @property
    def nbytes(self) -> int:
        return self.rung.nbytes

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows for ``ids`` (any shape): (*ids.shape, d) fp32."""
        return reconstruct_rows(self.rung, ids).reshape(*ids.shape, self.rung.dim)

    def dequantize(self) -> torch.Tensor:
        """The whole (V, d) table in fp32."""
        return reconstruct_rows(self.rung, torch.arange(self.rung.vocab_size))


def quantize(weight: torch.Tensor, name: str) -> QuantizedTable:
    """One baseline by name: ``fp32``, ``fp16``, ``int8`` or ``int4``."""
    if name not in BASELINE_RECIPES:
        raise EvaluationError(f"unknown baseline '{name}'; valid baselines: {', '.join(BASELINES)}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        got = f"{type(weight).__name__} {tuple(getattr(weight, 'shape', ()))} {getattr(weight, 'dtype', '')}"
        raise EvaluationError(f"expected a floating-point (V, d) embedding table, got {got}")
    return QuantizedTable(name, build(weight.detach(), BASELINE_RECIPES[name]))
