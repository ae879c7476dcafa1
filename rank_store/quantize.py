"""Quantization baselines for an embedding table: fp16, int8 and int4 per-row symmetric.

Pure functions of the (V, d) table. Each returns a :class:`QuantizedTable` holding what would
be stored (codes and scales) and the honest byte count of it: int4 codes are packed two per
byte, every row's scale is stored in fp16 and counted, and the dequantised table is computed
from the fp16-rounded scales actually stored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .core_quant import pack_int4, unpack_int4
from .errors import EvaluationError

log = logging.getLogger(__name__)

SCALE_DTYPE = torch.float16
SCALE_BYTES = 2


@dataclass(frozen=True)
class QuantizedTable:
    """A quantized (V, d) table: ``codes`` as stored, ``scales`` (V,) or None, and its bytes."""

    name: str
    codes: torch.Tensor  # fp32/fp16 (V, d), int8 (V, d), or uint8 (V, ceil(d/2)) for int4
    scales: torch.Tensor | None  # (V,) fp16, one per row
    dim: int
    nbytes: int

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows for ``ids`` (any shape), as a serving lookup would compute them."""
        rows = self.codes[ids]  # (..., d) or (..., ceil(d/2))
        if self.name == "int4":
            rows = unpack_int4(rows, self.dim)
        values = rows.to(torch.float32)
        if self.scales is not None:
            values = values * self.scales[ids].to(torch.float32).unsqueeze(-1)
        return values

    def dequantize(self) -> torch.Tensor:
        """The whole (V, d) table in fp32."""
        return self.lookup(torch.arange(self.codes.shape[0]))


def _check_table(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        got = f"{type(weight).__name__} {tuple(getattr(weight, 'shape', ()))} " \
              f"{getattr(weight, 'dtype', '')}"
        raise EvaluationError(f"expected a floating-point (V, d) embedding table, got {got}")
    return weight.detach().to(torch.float32)


def quantize_fp32(weight: torch.Tensor) -> QuantizedTable:
    """The dense fp32 table itself (the reference every ratio is measured against)."""
    table = _check_table(weight)
    return QuantizedTable("fp32", table, None, table.shape[1], table.numel() * 4)


def quantize_fp16(weight: torch.Tensor) -> QuantizedTable:
    """Half precision: 2 bytes per entry, no scales."""
    table = _check_table(weight)
    return QuantizedTable("fp16", table.to(torch.float16), None, table.shape[1], table.numel() * 2)


def _symmetric_rows(table: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric codes in [-qmax, qmax] and the fp16 scales they were made with."""
    amax = table.abs().amax(dim=1)  # (V,)
    scales = (amax / qmax).to(SCALE_DTYPE)  # what is stored
    stored = scales.to(torch.float32)
    safe = torch.where(stored > 0, stored, torch.ones_like(stored))  # all-zero rows: code 0
    codes = torch.round(table / safe.unsqueeze(1)).clamp_(-qmax, qmax)  # (V, d)
    return codes.to(torch.int8), scales


def quantize_int8(weight: torch.Tensor) -> QuantizedTable:
    """Per-row symmetric int8 (codes in [-127, 127]) with one fp16 scale per row."""
    table = _check_table(weight)
    codes, scales = _symmetric_rows(table, 127)
    vocab, dim = table.shape
    return QuantizedTable("int8", codes, scales, dim, vocab * dim + vocab * SCALE_BYTES)


def quantize_int4(weight: torch.Tensor) -> QuantizedTable:
    """Per-row symmetric int4 (codes in [-7, 7]), packed two per byte, one fp16 scale per row."""
    table = _check_table(weight)
    codes, scales = _symmetric_rows(table, 7)
    vocab, dim = table.shape
    packed = pack_int4(codes)  # (V, ceil(d/2)) uint8
    return QuantizedTable("int4", packed, scales, dim, packed.numel() + vocab * SCALE_BYTES)


BASELINES: dict[str, Callable[[torch.Tensor], QuantizedTable]] = {
    "fp32": quantize_fp32,
    "fp16": quantize_fp16,
    "int8": quantize_int8,
    "int4": quantize_int4,
}


def quantize(weight: torch.Tensor, name: str) -> QuantizedTable:
    """One baseline by name: ``fp32``, ``fp16``, ``int8`` or ``int4``."""
    if name not in BASELINES:
        raise EvaluationError(f"unknown baseline '{name}'; valid baselines: {', '.join(BASELINES)}")
    return BASELINES[name](weight)
