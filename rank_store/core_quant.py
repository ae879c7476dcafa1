"""Quantised TT cores: fp16, int8, int6 and int4 with per-(token, core) or per-(token, slice) scales.

Symmetric quantisation q = round(core / scale), scale = max|core| / qmax over a group, stored
as float16 (and the dequantisation uses the fp16-rounded scale actually stored). Groups:

* ``per="core"``: one scale per token per core, shape (V,). This is what the rung format
  stores for int8 cores (``group{g}.scale{k}``).
* ``per="slice"``: one scale per token per slice n_k of the core, shape (V, n_k); finer, costs
  2 * n_k bytes per token per core.

int4 and int6 codes live in an int8 tensor in memory; the rung format stores them packed along
n_k (:func:`pack_codes`: int4 two per byte, int6 four per three bytes, the last byte or bytes
padded), and :attr:`tensorslm.rank_store.rung.RankGroup.nbytes` counts them as stored. Expected
error: |core - q * scale| <= scale / 2 entrywise.
"""
from __future__ import annotations

import enum

import torch
from torch import Tensor

from .errors import RankStoreError


class CoreQuantError(RankStoreError, ValueError):
    """Bad inputs for core quantisation."""


class CoreDtype(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT6 = "int6"
    INT4 = "int4"

    @property
    def qmax(self) -> int:
        return {CoreDtype.INT8: 127, CoreDtype.INT6: 31, CoreDtype.INT4: 7}.get(self, 0)

    @property
    def bits(self) -> int:
        return {CoreDtype.FP32: 32, CoreDtype.FP16: 16, CoreDtype.INT8: 8, CoreDtype.INT6: 6, CoreDtype.INT4: 4}[self]

    @property
    def packed(self) -> bool:
        """Stored as uint8 bytes holding several codes (int4, int6)."""
        return self in (CoreDtype.INT4, CoreDtype.INT6)


def _dtype(dtype: CoreDtype | str) -> CoreDtype:
    try:
        return CoreDtype(dtype)
    except ValueError:
        raise CoreQuantError(f"core dtype must be one of {[d.value for d in CoreDtype]}, got {dtype!r}") from None


def quantize_core(core: Tensor, dtype: CoreDtype | str = "int8", per: str = "core") -> tuple[Tensor, Tensor | None]:
    """Quantise one stacked core (V, r_prev, n, r_next).

    Returns (q, scale): fp32/fp16 give (core cast, None); int8/int4 give int8 codes of the same
    shape and float16 scales (V,) for ``per="core"`` or (V, n) for ``per="slice"``.
    """
    kind = _dtype(dtype)
    if core.dim() != 4:
        raise CoreQuantError(f"a stacked core is (V, r_prev, n, r_next), got shape {tuple(core.shape)}")
    if kind is CoreDtype.FP32:
        return core.float(), None
    if kind is CoreDtype.FP16:
        return core.half(), None
    if per == "core":
        amax = core.abs().amax(dim=(1, 2, 3))  # (V,)
        expand = (slice(None), None, None, None)
    elif per == "slice":
        amax = core.abs().amax(dim=(1, 3))  # (V, n)
        expand = (slice(None), None, slice(None), None)
    else:
        raise CoreQuantError(f"per must be 'core' or 'slice', got {per!r}")
    scale = (amax / kind.qmax).to(torch.float16)  # (V,) or (V, n)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(core.float() / scale.float()[expand]).clamp_(-kind.qmax, kind.qmax)  # (V, r_prev, n, r_next)
    return q.to(torch.int8), scale


def pack_int4(codes: Tensor, dim: int = -1) -> Tensor:
    """int8 codes in [-8, 7] -> uint8, two per byte along ``dim`` (low nibble first; an odd
    length is padded with a zero code). The length is not stored: :func:`unpack_int4` needs it."""
    codes = codes.movedim(dim, -1)
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], dim=-1)  # (..., n + 1)
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)  # two's complement nibbles
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).movedim(-1, dim)


#: every byte's two codes (low nibble first), as float32: unpacking is one gather
_NIBBLE_PAIRS = torch.tensor([[(b & 0xF) - 16 * ((b & 0xF) > 7), (b >> 4) - 16 * ((b >> 4) > 7)]
                              for b in range(256)], dtype=torch.float32)  # (256, 2)


def unpack_int4(packed: Tensor, length: int, dim: int = -1, dtype: torch.dtype = torch.int8) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 -> codes, ``length`` of them along ``dim``, as
    ``dtype`` (int8 by default; float32 saves the cast when the codes are dequantised next)."""
    packed = packed.movedim(dim, -1)
    pairs = _NIBBLE_PAIRS.index_select(0, packed.reshape(-1).long()).reshape(*packed.shape, 2)  # (..., p, 2)
    codes = pairs.flatten(-2)[..., :length]  # (..., length)
    return codes.to(dtype).movedim(-1, dim)


def pack_int6(codes: Tensor, dim: int = -1) -> Tensor:
    """int8 codes in [-32, 31] -> uint8, four per three bytes along ``dim`` (codes offset by 32,
    6 bits each, low bits first; the length is padded to a multiple of 4 with zero codes)."""
    u = (codes.movedim(dim, -1).to(torch.int32) + 32)  # (..., n) in 0..63
    pad = (-u.shape[-1]) % 4
    if pad:
        u = torch.cat([u, torch.full((*u.shape[:-1], pad), 32, dtype=u.dtype)], dim=-1)  # (..., 4 m)
    c = u.reshape(*u.shape[:-1], -1, 4)  # (..., m, 4)
    b0 = c[..., 0] | ((c[..., 1] & 0x3) << 6)
    b1 = (c[..., 1] >> 2) | ((c[..., 2] & 0xF) << 4)
    b2 = (c[..., 2] >> 4) | (c[..., 3] << 2)
    return torch.stack([b0, b1, b2], dim=-1).flatten(-2).to(torch.uint8).movedim(-1, dim)  # (..., 3 m)


_INT6_SHIFTS = torch.tensor([0, 6, 12, 18], dtype=torch.int32)


def unpack_int6(packed: Tensor, length: int, dim: int = -1, dtype: torch.dtype = torch.int8) -> Tensor:
    """Inverse of :func:`pack_int6`: uint8 -> ``length`` codes along ``dim``, as ``dtype``.
    Each three bytes are read as one 24-bit word and split by four shifts."""
    b = packed.movedim(dim, -1).to(torch.int32)
    b = b.reshape(*b.shape[:-1], -1, 3)  # (..., m, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (..., m)
    codes = ((word.unsqueeze(-1) >> _INT6_SHIFTS) & 0x3F).flatten(-2)[..., :length]  # (..., length) in 0..63
    return (codes.to(dtype) - 32).movedim(-1, dim)


def packed_length(n: int, dtype: CoreDtype | str) -> int:
    """Bytes that ``n`` codes of a packed dtype take along the packing axis."""
    kind = _dtype(dtype)
    if kind is CoreDtype.INT4:
        return (n + 1) // 2
    if kind is CoreDtype.INT6:
        return 3 * ((n + 3) // 4)
    raise CoreQuantError(f"{kind.value} codes are not packed")


def pack_codes(codes: Tensor, dtype: CoreDtype | str, dim: int = -1) -> Tensor:
    """int4 or int6 codes packed into uint8 along ``dim`` (:func:`pack_int4`, :func:`pack_int6`)."""
    kind = _dtype(dtype)
    if kind is CoreDtype.INT4:
        return pack_int4(codes, dim)
    if kind is CoreDtype.INT6:
        return pack_int6(codes, dim)
    raise CoreQuantError(f"{kind.value} codes are not packed")


def unpack_codes(packed: Tensor, dtype: CoreDtype | str, length: int, dim: int = -1,
                 out: torch.dtype = torch.int8) -> Tensor:
    """Inverse of :func:`pack_codes`."""
    kind = _dtype(dtype)
    if kind is CoreDtype.INT4:
        return unpack_int4(packed, length, dim, out)
    if kind is CoreDtype.INT6:
        return unpack_int6(packed, length, dim, out)
    raise CoreQuantError(f"{kind.value} codes are not packed")
