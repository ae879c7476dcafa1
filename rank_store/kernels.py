"""The kernel layer: which matmul runs a linear layer for a given weight precision on this CPU.

The transformer body and the tied head both go through :class:`PackedLinear`: a weight packed
once, at load time, into the layout of the kernel chosen for it, and called as ``y = x @ W^T``
with fp32 in and fp32 out. The choice is a registry, :data:`REGISTRY`, listing for every
:class:`Precision` the kernels in preference order; the first one whose CPU requirement holds
wins, and the last entry of every list runs anywhere torch runs (a dequantise-then-fp32-matmul
that keeps the codes resident), so a CPU without the fast path is slower, never wrong.

Measured here (x86, AVX-512 with BF16, torch 2.13, batch 1; ``bench/bench_kernels.py``, figures
in bench/results/kernels.md and docs/engine.md): torch's packed weight-only kernels beat the
fp32 matmul only with bf16 activations, and its int4 kernel is faster than its int8 one even
when it reads as many bytes. So the x86 kernels cast the activations to bf16 where the CPU has
bf16 arithmetic, and int8 codes run as two int4 planes (``16 * hi + lo``, one int4 weight of
twice the rows, the two halves of the output added; ``int8-planes-bf16``: faster at batch 1,
slower than ``int8pack-bf16`` from a few rows per call, as in a prefill). A Raspberry Pi 4 or 5
(Cortex-A72/A76) has none; there int4 goes to ``_dyn_quant_matmul_4bit`` (int8 dynamic
activations, Arm KleidiAI) when torch was built with it, int8 to ``_weight_int8pack_mm`` with
fp32 activations. Those aarch64 choices are expected, not measured here (see docs/engine.md).

``force_kernel`` pins the choice (tests use it to run the fallbacks); :func:`kernels_used`
says which kernels have actually run since the last :func:`reset_kernels_used`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import platform
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RankStoreError

log = logging.getLogger(__name__)


class KernelError(RankStoreError, ValueError):
    """A weight that no kernel can pack (shape, dtype, precision), or an unknown kernel name."""


class Precision(str, Enum):
    """Weight precision of a linear layer (activations are chosen by the kernel)."""

    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"
    #: int8 weights times int8 activations quantised per token at run time (SmoothQuant input
    #: scales keep the activations' outlier channels from setting every token's step)
    W8A8 = "w8a8"

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        try:
            return cls(value)
        except ValueError:
            raise KernelError(f"unknown precision {value!r}; expected one of "
                              f"{', '.join(p.value for p in cls)}") from None

    @property
    def bits(self) -> int:
        return {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4, "w8a8": 8}[self.value]


#: group sizes the int4 kernels accept, largest first
INT4_GROUP_SIZES = (256, 128, 64, 32)
DEFAULT_INT4_GROUP = 32


@dataclass(frozen=True)
class CpuFeatures:
    """What the kernels need to know about the CPU torch runs on."""

    arch: str              # platform.machine(): x86_64, aarch64, ...
    capability: str        # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, DEFAULT, ...
    bf16: bool             # native bf16 arithmetic (AVX-512 BF16 / AMX on x86; Arm BF16 extension)
    neon: bool             # aarch64 (NEON is mandatory there)
    kleidiai: bool         # torch built with Arm KleidiAI (the fast _dyn_quant_matmul_4bit)
    #: torch's int8 x int8 engine for quantized.linear_dynamic: fbgemm (x86 with VNNI),
    #: qnnpack (Arm), or None
    int8_engine: str | None = None

    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i686")


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    arch = platform.machine()
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    if arch not in ("x86_64", "AMD64"):
        # oneDNN may emulate bf16 on Arm; count only the hardware extension
        bf16 = bf16 and _cpuinfo_has("bf16")
    kleidi = torch.backends.kleidiai.is_available() if hasattr(torch.backends, "kleidiai") else False
    # fbgemm multiplies uint8 by int8 with saturating 16-bit pair sums unless the CPU has VNNI
    # (the full 8-bit activation range then overflows), so x86 without VNNI gets no int8 engine
    engines = torch.backends.quantized.supported_engines
    if arch in ("aarch64", "arm64"):
        int8_engine = "qnnpack" if "qnnpack" in engines else None
    else:
        vnni = _cpuinfo_has("avx512_vnni") or _cpuinfo_has("avx_vnni")
        int8_engine = "fbgemm" if vnni and "fbgemm" in engines else None
    return CpuFeatures(arch=arch, capability=capability, bf16=bf16,
                       neon=arch in ("aarch64", "arm64"), kleidiai=bool(kleidi),
                       int8_engine=int8_engine)


def _cpuinfo_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return False
    return any(flag in line.split() for line in text.splitlines()
               if line.startswith(("flags", "Features")))


# ----------------------------------------------------------------------------- quantization

def quantize_int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: codes (N, K) int8 in [-127, 127], scales (N,) fp32."""
    w = weight.detach().to(torch.float32)
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return codes, scales


#: clipping ratios of a group's absolute maximum that symmetric int4 scales are chosen among
INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)


def best_int4_scales(w: Tensor, candidates: Iterable[Tensor]) -> Tensor:
    """Of the candidate scales (..., G, 1) for the groups ``w`` (..., G, g), each group's with
    the smallest squared error of its symmetric int4 codes (``round(w / scale)`` in [-8, 7])."""
    best_err = best_scale = None
    for scale in candidates:
        err = ((torch.round(w / scale).clamp(-8, 7) * scale - w) ** 2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale


def quantize_int4_groups(weight: Tensor, group_size: int = DEFAULT_INT4_GROUP
                         ) -> tuple[Tensor, Tensor]:
    """Symmetric int4 in groups of ``group_size`` along K: codes (N, K) int8 in [-8, 7], scales
    (N, K // group_size) fp32. Each group's scale is chosen among a few clipping ratios of its
    absolute maximum by the smallest squared error (clipping the largest weight a little buys
    resolution for the rest)."""
    n, k = weight.shape
    _check_group(k, group_size)
    w = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)  # (N, G, g)
    amax = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, G, 1)
    best_scale = best_int4_scales(w, (amax * ratio / 7.0 for ratio in INT4_CLIP_RATIOS))
    codes = torch.round(w / best_scale).clamp(-8, 7).to(torch.int8).reshape(n, k)
    return codes, best_scale.reshape(n, k // group_size)


def quantize_int4_groups_asymmetric(weight: Tensor, group_size: int = DEFAULT_INT4_GROUP
                                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 in groups of ``group_size`` along K: codes (N, K) int8 in [-8, 7], scales
    and zeros (N, K // group_size) fp32, ``W = codes * scale + zero`` per group.

    The 16 levels span each group's [min, max] (a skewed group wastes none of them on the side
    it lacks), narrowed by the few ratios that give the smallest squared error, or [min, max]
    is 14 or 13 steps of a grid (a group that came from a 4-bit block and leaves its top or
    bottom level unused comes back exactly); then scale and zero are refitted to the chosen
    codes by least squares."""
    n, k = weight.shape
    _check_group(k, group_size)
    w = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)  # (N, G, g)
    lo = w.amin(dim=-1, keepdim=True)  # (N, G, 1)
    hi = w.amax(dim=-1, keepdim=True)
    best_err = best_codes = best_scale = None
    clipped = [(r_lo, r_hi, 15) for r_lo in (1.0, 0.9, 0.8) for r_hi in (1.0, 0.9, 0.8)]
    for r_lo, r_hi, steps in clipped + [(1.0, 1.0, 14), (1.0, 1.0, 13)]:
        a, b = lo * r_lo, hi * r_hi
        scale = ((b - a) / steps).clamp(min=1e-12)
        zero = a + 8 * scale
        q = torch.round((w - zero) / scale).clamp(-8, 7)  # (N, G, g)
        err = ((q * scale + zero - w) ** 2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_codes, best_scale = err, q, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_codes = torch.where(better, q, best_codes)
            best_scale = torch.where(better, scale, best_scale)
    scale, zero = fit_scale_zero(w, best_codes, best_scale)
    return (best_codes.to(torch.int8).reshape(n, k), scale.reshape(n, k // group_size),
            zero.reshape(n, k // group_size))


def fit_scale_zero(w: Tensor, q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares ``w ~ q * scale + zero`` per group (last axis) for codes ``q``; (..., 1)
    each. A group whose codes are all equal keeps ``scale`` and gets the mean as its zero."""
    qm, wm = q.mean(dim=-1, keepdim=True), w.mean(dim=-1, keepdim=True)
    dq = q - qm
    var = (dq * dq).sum(dim=-1, keepdim=True)
    fitted = (dq * (w - wm)).sum(dim=-1, keepdim=True) / var.clamp(min=1e-12)
    scale = torch.where((var > 0) & (fitted > 0), fitted, scale)
    return scale, wm - scale * qm


def dequantize_int4_groups(codes: Tensor, scales: Tensor, zeros: Tensor | None = None) -> Tensor:
    """fp32 (N, K) weight of int4 group codes: ``codes * scale (+ zero)`` per group."""
    n, k = codes.shape
    g = k // scales.shape[1]
    w = codes.to(torch.float32).reshape(n, k // g, g) * scales.to(torch.float32)[:, :, None]
    if zeros is not None:
        w = w + zeros.to(torch.float32)[:, :, None]
    return w.reshape(n, k)


def _check_group(k: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        raise KernelError(f"int4 group size must be one of {INT4_GROUP_SIZES} and divide "
                          f"in_features; got group {group_size} for in_features {k}")


def int4_group_for(k: int) -> int:
    """The largest int4 group size dividing ``k`` (whole-row scales are repeated per group)."""
    for g in INT4_GROUP_SIZES:
        if k % g == 0:
            return g
    raise KernelError(f"in_features {k} is not a multiple of any int4 group size {INT4_GROUP_SIZES}")


# ----------------------------------------------------------------------------- kernels

@dataclass(frozen=True)
class Kernel:
    """One way to run a linear layer of one precision: a CPU requirement, a packer and a call.

    ``pack(codes, scales, group_size, zeros)`` returns the resident tensors (``zeros`` is None
    except for asymmetric int4); ``run(x2d, tensors,
    group_size, n, k)`` computes the (M, N) fp32 output from the (M, K) fp32 input."""

    name: str
    precision: Precision
    requires: Callable[[CpuFeatures], bool]
    pack: Callable[[Tensor, Tensor | None, int, Tensor | None], tuple[Tensor, ...]]
    run: Callable[[Tensor, tuple[Tensor, ...], int, int, int], Tensor]
    note: str
    fits: Callable[[int, int], bool] = lambda n, k: True  # (out_features, in_features) it packs
    #: int4 kernels: whether it takes a zero point per group (W = codes * scale + zero)
    zero_points: bool = False


def _anywhere(_: CpuFeatures) -> bool:
    return True


def _has_bf16(cpu: CpuFeatures) -> bool:
    return cpu.bf16


# fp32 -------------------------------------------------------------------------------------
#: alignment torch's allocator gives every tensor; kernels may assume it (the batched path of
#: _weight_int8pack_mm faults on a weight that is not 64-byte aligned)
ALIGNMENT = 64


def _aligned(t: Tensor) -> Tensor:
    """``t`` contiguous at an address the kernels accept: a weight that is a view into a
    loaded file (a store's rung or body) is copied when it is not aligned."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def _pack_fp32(w: Tensor, _s: Tensor | None, _g: int, _z: Tensor | None) -> tuple[Tensor, ...]:
    return (_aligned(w.to(torch.float32)),)


def mm_fp32(x: Tensor, a: Tensor, b: Tensor, g: int, n: int, k: int) -> Tensor:
    return torch.nn.functional.linear(x, a)


# bf16 -------------------------------------------------------------------------------------
def _pack_bf16(w: Tensor, _s: Tensor | None, _g: int, _z: Tensor | None) -> tuple[Tensor, ...]:
    return (_aligned(w.to(torch.bfloat16)),)


def mm_bf16(x: Tensor, a: Tensor, b: Tensor, g: int, n: int, k: int) -> Tensor:
    return torch.nn.functional.linear(x.to(torch.bfloat16), a).to(torch.float32)


def _run_bf16_upcast(x: Tensor, t: tuple[Tensor, ...], _g: int, _n: int, _k: int) -> Tensor:
    return torch.nn.functional.linear(x, t[0].to(torch.float32))


# int8 -------------------------------------------------------------------------------------
def _pack_int8_bf16(codes: Tensor, scales: Tensor | None, _g: int, _z: Tensor | None
                    ) -> tuple[Tensor, ...]:
    return (_aligned(codes), _aligned(scales.to(torch.bfloat16)))


def mm_int8_bf16(x: Tensor, a: Tensor, b: Tensor, g: int, n: int, k: int) -> Tensor:
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), a, b).to(torch.float32)


def _pack_int8_fp32(codes: Tensor, scales: Tensor | None, _g: int, _z: Tensor | None
                    ) -> tuple[Tensor, ...]:
    return (_aligned(codes), _aligned(scales.to(torch.float32)))


def mm_int8_fp32(x: Tensor, a: Tensor, b: Tensor, g: int, n: int, k: int) -> Tensor:
    return torch._weight_int8pack_mm(x, a, b)


def _run_int8_dequant(x: Tensor, t: tuple[Tensor, ...], _g: int, _n: int, _k: int) -> Tensor:
    return torch.nn.functional.linear(x, t[0].to(torch.float32) * t[1][:, None])


# int8 as two int4 planes ------------------------------------------------------------------
#: rows converted to the int4 layout at a time (a multiple of the layout's 64-row blocks; keeps
#: the int32 temporary small for a head's 49,152 rows)
_PLANE_CHUNK = 4096
#: each plane's rows are padded to a multiple of this (torch's int4 packing takes 2N in
#: multiples of 16)
PLANE_ROW_MULTIPLE = 8


def split_int8_planes(codes: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes (N, K) -> (hi, lo), both int8 (N, K), with ``codes == 16 * hi + lo`` exactly:
    lo = codes & 15 in [0, 15], hi = codes >> 4 in [-8, 7] (every code in [-128, 127])."""
    c = codes.to(torch.int16)
    return (c >> 4).to(torch.int8), (c & 15).to(torch.int8)


#: what :func:`releasing_rows` was given: called with each block of codes a packer has read
_release_rows: contextvars.ContextVar[Callable[[Tensor], None] | None] = \
    contextvars.ContextVar("release_rows", default=None)


@contextlib.contextmanager
def releasing_rows(release: Callable[[Tensor], None] | None) -> Iterator[None]:
    """Within the block, packing int8 rows (checking their range, splitting them into planes),
    :func:`plane_row_norms` and :func:`row_blocks` call ``release(block)`` with each block of
    the codes once they have read it: a caller packing from a memory-mapped file (a rung's
    rows) hands those pages back as it goes, so the file's pages and the packed copy are not
    resident whole at once."""
    token = _release_rows.set(release)
    try:
        yield
    finally:
        _release_rows.reset(token)


def row_blocks(codes: Tensor, size: int = 4096) -> Iterator[tuple[int, Tensor]]:
    """``(start, codes[start:start + size])`` over the rows of ``codes``, each block handed to
    the :func:`releasing_rows` callback once the caller has read it."""
    release = _release_rows.get()
    for start in range(0, codes.shape[0], size):
        block = codes[start : start + size]
        yield start, block
        if release is not None:
            release(block)


def _plane_codes(codes: Tensor, rows: int, start: int, stop: int) -> Tensor:
    """Rows start:stop of the stacked unsigned codes [hi + 8; lo] of int8 ``codes`` (N, K),
    each plane padded to ``rows`` rows with the code 8 (zero); (stop - start, K) int32, split
    from only the code rows it needs."""
    n, k = codes.shape
    out = torch.full((stop - start, k), 8, dtype=torch.int32)
    for offset, high in ((0, True), (rows, False)):
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            block = codes[a - offset : b - offset]
            hi, lo = split_int8_planes(block)
            out[a - start : b - start] = hi.to(torch.int32) + 8 if high else lo.to(torch.int32)
            release = _release_rows.get()
            if release is not None:
                release(block)
    return out


def _pack_rows_in_chunks(rows: int, k: int, chunk: Callable[[int, int], Tensor]) -> Tensor:
    """torch's CPU int4 layout (rows, K/2) uint8 of ``rows`` unsigned code rows, converted
    ``_PLANE_CHUNK`` rows at a time (``chunk(start, stop)`` gives them as int32) into one
    preallocated tensor: no whole-weight int32 copy, no second packed copy."""
    packed = torch.empty(rows, k // 2, dtype=torch.uint8)
    for a in range(0, rows, _PLANE_CHUNK):
        b = min(a + _PLANE_CHUNK, rows)
        packed[a:b] = torch._convert_weight_to_int4pack_for_cpu(chunk(a, b).contiguous(), 2)
    return packed


def _pack_int8_planes(codes: Tensor, scales: Tensor | None, _g: int, _z: Tensor | None
                      ) -> tuple[Tensor, ...]:
    # W = codes * s = (16 hi + 8) s + (lo - 8) s, both planes in ONE int4 weight of 2N' rows
    # (N' = N padded to PLANE_ROW_MULTIPLE): plane hi as code hi + 8, scale 16 s, zero 8 s;
    # plane lo as code lo, scale s, zero 0 (the kernel dequantises (q - 8) * scale + zero).
    # Centring lo on zero keeps the second product, rounded to bf16 on its own, small.
    n, k = codes.shape
    g = int4_group_for(k)
    rows = n + (-n % PLANE_ROW_MULTIPLE)
    packed = _pack_rows_in_chunks(2 * rows, k, lambda a, b: _plane_codes(codes, rows, a, b))
    s = torch.zeros(rows)
    s[:n] = scales.to(torch.float32)
    scale = torch.cat([16 * s, s])  # (2N',)
    zero = torch.cat([8 * s, torch.zeros(rows)])  # (2N',)
    # (K/g, 2N', 2) bf16; bf16(16 s) and bf16(8 s) are 16 and 8 times bf16(s): the planes add
    # up to codes * bf16(s) exactly, the weight int8pack-bf16 multiplies by
    scale_zero = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)
    return packed, scale_zero[None].expand(k // g, 2 * rows, 2).contiguous()


def mm_int8_planes(x: Tensor, a: Tensor, b: Tensor, g: int, n: int, k: int) -> Tensor:
    # a: the packed planes, b: their (K/g, 2N', 2) scales and zeros
    rows = b.shape[1] // 2
    y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), a, k // b.shape[0],
                                          b)  # (M, 2N') bf16
    y = y.view(x.shape[0], 2, rows).sum(dim=1, dtype=torch.float32)  # (M, N'): hi + lo plane
    return y if rows == n else y[:, :n]


def _fits_planes(_n: int, k: int) -> bool:
    # Every shape an int4 group divides. In the SmolLM2 int8 engine (bench/bench_body_kernels.py,
    # bench/results/body_kernels.md) the planes everywhere decode at 16.9 body ms/token against
    # 17.5 with them on gate_up only and 19.2 with none, while a 48-token prefill costs 272 /
    # 218 / 167 ms: per query (48 in, 64 out) within 4% of each other, and the longer the
    # reply the more the planes gain.
    return any(k % g == 0 for g in INT4_GROUP_SIZES)


#: the kernel that splits int8 codes into two int4 planes (its output rounding: plane_row_norms)
PLANES_KERNEL = "int8-planes-bf16"


def plane_row_norms(codes: Tensor, scales: Tensor) -> Tensor:
    """(N,): s_v (||16 hi_v + 8|| + ||lo_v - 8||), the summed norms of the two plane rows that
    ``int8-planes-bf16`` multiplies and rounds to bf16 separately (at least ||codes_v|| s_v)."""
    norms = torch.empty(codes.shape[0])
    for a, block in row_blocks(codes, _PLANE_CHUNK):
        hi, lo = split_int8_planes(block)
        norms[a : a + _PLANE_CHUNK] = ((16 * hi.float() + 8).norm(dim=1)
                                        + (lo.float() - 8).norm(dim=1))
    return norms * scales.to(torch.float32)


# int4 -------------------------------------------------------------------------------------
def _pack_int4_tinygemm(codes: Tensor, scales: Tensor | None, g: int, zeros: Tensor | None
                        ) -> tuple[Tensor, ...]:
    # (N, K) codes in [-8, 7] -> unsigned nibbles 0..15, packed by torch into its CPU layout
    n, k = codes.shape
    packed = _pack_rows_in_chunks(n, k, lambda a, b: codes[a:b].to(torch.int32) + 8)
    # dequantised as (u - 8) * scale + zero = codes * scale + zero; symmetric: zero = 0.
    s = scales.to(torch.float32).t()  # (K/g, N)
    z = torch.zeros_like(s) if zeros is None else zeros.to(torch.float32).t()  # (K/g, N)
    scale_zero = torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
    return packed, scale_zero


def mm_int4_bf16(x: Tensor, a: Tensor, b: Tensor, g: int, n: int, k: int) -> Tensor:
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), a, g, b).to(torch.float32)


def mm_int4_fp32(x: Tensor, a: Tensor, b: Tensor, g: int, n: int, k: int) -> Tensor:
    return torch._weight_int4pack_mm_for_cpu(x, a, g, b.to(torch.float32))


def _pack_int4_dyn(codes: Tensor, scales: Tensor | None, g: int, _z: Tensor | None
                   ) -> tuple[Tensor, ...]:
    n, k = codes.shape
    u = (codes.to(torch.int16) + 8).to(torch.uint8)  # (N, K) 0..15
    nibbles = (u[:, 1::2] << 4 | u[:, 0::2]).contiguous()  # (N, K/2), low nibble first
    packed = torch._dyn_quant_pack_4bit_weight(nibbles, scales.to(torch.bfloat16).contiguous(),
                                              None, g, k, n)
    return (packed,)


def mm_int4_dyn(x: Tensor, a: Tensor, b: Tensor, g: int, n: int, k: int) -> Tensor:
    return torch._dyn_quant_matmul_4bit(x, a, g, k, n)


def _pack_int4_codes(codes: Tensor, scales: Tensor | None, _g: int, zeros: Tensor | None
                     ) -> tuple[Tensor, ...]:
    u = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()  # (N, K/2) two's complement nibbles
    scales = scales.to(torch.float32).contiguous()
    return (packed, scales) if zeros is None else (packed, scales,
                                                   zeros.to(torch.float32).contiguous())


def _run_int4_dequant(x: Tensor, t: tuple[Tensor, ...], g: int, n: int, k: int) -> Tensor:
    packed, scales, *zeros = t
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    codes = torch.stack([lo, hi], dim=-1).reshape(n, k)  # (N, K)
    codes = torch.where(codes > 7, codes - 16, codes)
    w = dequantize_int4_groups(codes, scales, zeros[0] if zeros else None)  # (N, K)
    return torch.nn.functional.linear(x, w)


# w8a8: int8 weights x per-token int8 activations -------------------------------------------
def _token_grid(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row of ``x`` (M, K) on its own uint8 grid, as the int8 step of
    ``quantized.linear_dynamic`` puts one token: asymmetric over [min(x, 0), max(x, 0)], full
    range. Returns the codes (M, K) in 0..255 (as floats), each row's step and zero point
    (M, 1); an all-zero row keeps step 1 and stays zero."""
    lo = x.amin(1, keepdim=True).clamp(max=0)
    step = (x.amax(1, keepdim=True).clamp(min=0) - lo) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))
    zero = torch.round(-lo / step)
    return torch.round(x / step + zero).clamp(0, 255), step, zero


def _pack_w8a8_dynamic(codes: Tensor, scales: Tensor | None, _g: int, _z: Tensor | None
                       ) -> tuple[Any, ...]:
    # this CPU's engine, or (a forced kernel) any engine torch has
    engine = cpu_features().int8_engine or next(
        (e for e in ("fbgemm", "qnnpack") if e in torch.backends.quantized.supported_engines), None)
    if engine is None:
        raise KernelError("w8a8-dynamic needs torch's fbgemm or qnnpack engine; this torch has "
                          f"{', '.join(torch.backends.quantized.supported_engines)}")
    torch.backends.quantized.engine = engine
    n = codes.shape[0]
    row_scales, zeros = scales.to(torch.float64), torch.zeros(n, dtype=torch.long)
    sums = torch.empty(n, dtype=torch.int32)   # each row's sum of codes
    with warnings.catch_warnings():   # torch marks its quantized tensors deprecated (2.13 has them)
        warnings.simplefilter("ignore", UserWarning)
        # the quantized weight filled block by block, each block's sums taken as it is read:
        # a mapped file's pages go back per block (row_blocks), so the codes and this copy are
        # never resident whole together beside fbgemm's packed one
        weight = torch._empty_per_channel_affine_quantized(
            tuple(codes.shape), scales=row_scales, zero_points=zeros, axis=0, dtype=torch.qint8)
        for start, block in row_blocks(codes):
            stop = start + block.shape[0]
            weight[start:stop].copy_(torch._make_per_channel_quantized_tensor(
                block.contiguous(), row_scales[start:stop], zeros[start:stop], 0))
            # int32 sums of 256 rows at a time (a whole block's int32 copy adds 20-40 MB to
            # the peak of packing Gemma's head)
            for i in range(start, stop, 256):
                sums[i:i + 256] = codes[i:i + 256].sum(1, dtype=torch.int32)
        params = torch.ops.quantized.linear_prepack(weight, None)
    return params, sums.to(torch.float32) * scales.to(torch.float32)


def _run_w8a8_dynamic(x: Tensor, t: tuple[Any, ...], _g: int, _n: int, _k: int) -> Tensor:
    if x.shape[0] == 1:   # decode: one call quantises the token and multiplies in int8
        return torch.ops.quantized.linear_dynamic(x, t[0], False)
    return _w8a8_rows(x, t[0], t[1])


def _w8a8_rows(x: Tensor, params: Any, weight_sums: Tensor) -> Tensor:
    """Several tokens (a prefill) in one int8 GEMM, each quantised on its own grid exactly as
    decode quantises it (:func:`_token_grid`). The kernel puts its whole input on one
    grid, from the input's range; so each token goes in as its own uint8 codes / 255, with a
    row holding 0 and 1 appended, which makes that one grid exactly ``q / 255``. Undoing the
    map: ``W x_q = step (255 W (q / 255) - zero W 1)``, ``W 1`` being each weight row's sum,
    kept at packing."""
    codes, step, zero = _token_grid(x)
    corner = torch.zeros(1, x.shape[1], dtype=x.dtype)
    corner[0, 0] = 1.0
    y = torch.ops.quantized.linear_dynamic(torch.cat([codes / 255, corner]), params, False)[:-1]
    return step * (255 * y - zero * weight_sums)


def _run_w8a8_dequant(x: Tensor, t: tuple[Tensor, ...], _g: int, _n: int, _k: int) -> Tensor:
    codes, step, zero = _token_grid(x)   # each token dequantised from its own grid
    return torch.nn.functional.linear((codes - zero) * step,
                                      t[0].to(torch.float32) * t[1][:, None])


# the calls TorchScript compiles ------------------------------------------------------------
#: kernels whose call is one of the ``mm_*`` functions above (two packed tensors ``a``, ``b``;
#: ``b`` unused by some), in the order of :func:`scripted_linear`'s branches, then
#: ``w8a8-dynamic`` (:func:`mm_w8a8`). The engine's decode step runs as one TorchScript
#: function when every body linear has one of these (:mod:`tensorslm.rank_store.decode_step`);
#: the dequantising fallbacks run from Python only.
SCRIPTED_KERNELS = ("fp32-matmul", "bf16-matmul", "int8-planes-bf16", "int8pack-bf16",
                    "int8pack-fp32", "int4pack-bf16", "int4pack-fp32", "int4-dynquant",
                    "w8a8-dynamic")
W8A8_SCRIPTED = SCRIPTED_KERNELS.index("w8a8-dynamic")


def scripted_linear(x: Tensor, kind: int, a: Tensor, b: Tensor, g: int, n: int, k: int
                    ) -> Tensor:
    """``x @ W^T`` by kernel :data:`SCRIPTED_KERNELS` [``kind``] (TorchScript compiles this)."""
    if kind == 0:
        return mm_fp32(x, a, b, g, n, k)
    if kind == 1:
        return mm_bf16(x, a, b, g, n, k)
    if kind == 2:
        return mm_int8_planes(x, a, b, g, n, k)
    if kind == 3:
        return mm_int8_bf16(x, a, b, g, n, k)
    if kind == 4:
        return mm_int8_fp32(x, a, b, g, n, k)
    if kind == 5:
        return mm_int4_bf16(x, a, b, g, n, k)
    if kind == 6:
        return mm_int4_fp32(x, a, b, g, n, k)
    if kind == 7:
        return mm_int4_dyn(x, a, b, g, n, k)
    raise RuntimeError("scripted_linear: w8a8 runs through mm_w8a8")


def mm_w8a8(x: Tensor, scale: Tensor,
            params: torch.classes.quantized.LinearPackedParamsBase) -> Tensor:
    """``w8a8-dynamic`` for one token (TorchScript compiles this): ``scale`` (K,) multiplies
    the input first (empty: no input scale), then ``quantized.linear_dynamic``."""
    if scale.numel() > 0:
        x = x * scale
    return torch.ops.quantized.linear_dynamic(x, params, False)


@dataclass(frozen=True)
class ScriptedCall:
    """What the scripted decode step needs to run one packed linear: ``kind`` (index into
    :data:`SCRIPTED_KERNELS`), tensors ``a`` and ``b`` for :func:`scripted_linear` (for w8a8:
    the input scale or an empty tensor, and an empty tensor) and, for w8a8, the kernel's
    packed object."""

    kind: int
    a: Tensor
    b: Tensor
    params: torch.ScriptObject | None = None


def _pair(call: Callable[[Tensor, Tensor, Tensor, int, int, int], Tensor]
          ) -> Callable[[Tensor, tuple[Tensor, ...], int, int, int], Tensor]:
    """A kernel's ``run`` from its ``mm_*`` call: the packed tuple's first two tensors (the
    first twice for kernels that keep one)."""
    def run(x: Tensor, t: tuple[Tensor, ...], g: int, n: int, k: int) -> Tensor:
        return call(x, t[0], t[-1], g, n, k)
    return run


_FALLBACK_NOTE = "dequantise the resident codes to fp32 per call, then an fp32 matmul; runs anywhere"

#: int8 weights: planes where the shape fits, else int8pack; the last runs anywhere
_INT8_KERNELS = (
    Kernel(PLANES_KERNEL, Precision.INT8, _has_bf16, _pack_int8_planes,
           _pair(mm_int8_planes),
           "codes split into 16 * hi + lo, both int4 planes in one "
           "torch._weight_int4pack_mm_for_cpu weight, bf16 activations; in_features a "
           "multiple of 32", _fits_planes),
    Kernel("int8pack-bf16", Precision.INT8, _has_bf16, _pack_int8_bf16, _pair(mm_int8_bf16),
           "torch._weight_int8pack_mm, bf16 activations, per-row scales"),
    Kernel("int8pack-fp32", Precision.INT8, lambda c: c.neon, _pack_int8_fp32,
           _pair(mm_int8_fp32),
           "torch._weight_int8pack_mm, fp32 activations (aarch64 without bf16)"),
    Kernel("int8-dequant", Precision.INT8, _anywhere, _pack_int8_fp32, _run_int8_dequant,
           _FALLBACK_NOTE),
)

#: for each precision, the kernels in preference order; the last runs on any CPU
REGISTRY: dict[Precision, tuple[Kernel, ...]] = {
    Precision.FP32: (
        Kernel("fp32-matmul", Precision.FP32, _anywhere, _pack_fp32, _pair(mm_fp32),
               "dense fp32 matmul (oneDNN / OpenBLAS)"),
    ),
    Precision.BF16: (
        Kernel("bf16-matmul", Precision.BF16, _has_bf16, _pack_bf16, _pair(mm_bf16),
               "bf16 weights and activations; needs bf16 arithmetic"),
        Kernel("bf16-upcast", Precision.BF16, _anywhere, _pack_bf16, _run_bf16_upcast,
               "bf16 weights widened to fp32 per call; " + _FALLBACK_NOTE),
    ),
    Precision.INT8: _INT8_KERNELS,
    # without an int8 x int8 engine the codes run through the int8 kernels (the same int8
    # weights, activations as the int8 body has them: fast, and what the CPU can do); the
    # w8a8 arithmetic itself, emulated in fp32, is the last resort
    Precision.W8A8: (
        Kernel("w8a8-dynamic", Precision.W8A8, lambda c: c.int8_engine is not None,
               _pack_w8a8_dynamic, _run_w8a8_dynamic,
               "torch.ops.quantized.linear_dynamic (fbgemm on x86, qnnpack on Arm): each token "
               "quantised to uint8 per call, int8 x int8 products, per-row weight scales"),
        *_INT8_KERNELS[:-1],
        Kernel("w8a8-dequant", Precision.W8A8, _anywhere, _pack_int8_fp32, _run_w8a8_dequant,
               "each token quantised as w8a8-dynamic does, then " + _FALLBACK_NOTE),
    ),
    Precision.INT4: (
        Kernel("int4pack-bf16", Precision.INT4, _has_bf16, _pack_int4_tinygemm,
               _pair(mm_int4_bf16),
               "torch._weight_int4pack_mm_for_cpu, bf16 activations, group scales (and zeros)",
               zero_points=True),
        Kernel("int4-dynquant", Precision.INT4, lambda c: c.kleidiai, _pack_int4_dyn,
               _pair(mm_int4_dyn),
               "torch._dyn_quant_matmul_4bit: int8 dynamic activations, Arm KleidiAI; "
               "symmetric groups only"),
        Kernel("int4pack-fp32", Precision.INT4, lambda c: c.neon, _pack_int4_tinygemm,
               _pair(mm_int4_fp32),
               "torch._weight_int4pack_mm_for_cpu, fp32 activations (aarch64 without KleidiAI, "
               "or asymmetric groups)", zero_points=True),
        Kernel("int4-dequant", Precision.INT4, _anywhere, _pack_int4_codes, _run_int4_dequant,
               _FALLBACK_NOTE, zero_points=True),
    ),
}

_KERNELS = {k.name: k for kernels in REGISTRY.values() for k in kernels}
_forced: dict[Precision, str] = {}
_used: Counter[str] = Counter()


def kernel_names(precision: Precision | str | None = None) -> tuple[str, ...]:
    if precision is None:
        return tuple(_KERNELS)
    return tuple(k.name for k in REGISTRY[Precision.parse(precision)])


def select_kernel(precision: Precision | str, cpu: CpuFeatures | None = None,
                  shape: tuple[int, int] | None = None, *, zero_points: bool = False) -> Kernel:
    """The kernel that runs ``precision`` on ``cpu`` (this CPU by default): the forced one if
    :func:`force_kernel` is active, else the first in :data:`REGISTRY` whose requirement holds
    and, given a weight ``shape`` (out_features, in_features), that packs that shape, and that
    takes a zero point per group if ``zero_points``."""
    precision = Precision.parse(precision)
    if precision in _forced:
        kernel = _KERNELS[_forced[precision]]
        if zero_points and not kernel.zero_points:
            raise KernelError(f"the forced kernel {kernel.name} takes no zero points; asymmetric "
                              "int4 runs on "
                              + ", ".join(k.name for k in REGISTRY[precision] if k.zero_points))
        return kernel
    cpu = cpu or cpu_features()
    for kernel in REGISTRY[precision]:
        if (kernel.requires(cpu) and (shape is None or kernel.fits(*shape))
                and (kernel.zero_points or not zero_points)):
            return kernel
    raise AssertionError("the last kernel of every precision runs anywhere")  # unreachable


@contextlib.contextmanager
def force_kernel(name: str) -> Iterator[Kernel]:
    """Within the block, weights packed for the kernel's precision use kernel ``name`` (whatever
    the CPU says). Weights packed before or after keep their own kernel."""
    if name not in _KERNELS:
        raise KernelError(f"unknown kernel {name!r}; expected one of {', '.join(_KERNELS)}")
    kernel = _KERNELS[name]
    previous = _forced.get(kernel.precision)
    _forced[kernel.precision] = name
    try:
        yield kernel
    finally:
        if previous is None:
            _forced.pop(kernel.precision, None)
        else:
            _forced[kernel.precision] = previous


def kernels_used() -> dict[str, int]:
    """Kernel name -> number of packed weights that have run it at least once (since the last
    :func:`reset_kernels_used`)."""
    return dict(_used)


def reset_kernels_used() -> None:
    _used.clear()


# ----------------------------------------------------------------------------- packed weights

class PackedLinear(nn.Module):
    """``y = x @ W^T (+ bias)`` with W packed for one kernel; fp32 in, fp32 out.

    Build with :func:`pack_linear` (from a float weight) or :func:`pack_int8_rows` /
    :func:`pack_int4_rows` / :func:`pack_int4_groups` (from existing codes). :attr:`nbytes`
    counts what stays resident: every packed tensor and the bias."""

    def __init__(self, kernel: Kernel, packed: tuple[Tensor, ...], out_features: int,
                 in_features: int, group_size: int = 0, bias: Tensor | None = None,
                 input_scale: Tensor | None = None) -> None:
        super().__init__()
        #: (K,) multiplies the input before the kernel (SmoothQuant's 1 / s for w8a8 weights
        #: stored as W * s)
        self.input_scale = None if input_scale is None else input_scale.detach().to(torch.float32)
        self.kernel_spec = kernel
        self.out_features = out_features
        self.in_features = in_features
        self.group_size = group_size
        self._packed = packed
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self._run = kernel.run
        self._ran = False

    @property
    def kernel(self) -> str:
        return self.kernel_spec.name

    def shares_memory_with(self, tensor: Tensor) -> bool:
        """Whether a packed tensor is ``tensor``'s memory (kernels that take int8 codes as
        they are keep the caller's tensor instead of a copy)."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(isinstance(t, Tensor) and t.untyped_storage().data_ptr() == ptr
                   for t in self._packed)

    @property
    def precision(self) -> Precision:
        return self.kernel_spec.precision

    @property
    def nbytes(self) -> int:
        extra = [t for t in (self.bias, self.input_scale) if t is not None]
        opaque = sum(not isinstance(t, Tensor) for t in self._packed)
        # a kernel's own packed object (w8a8-dynamic): its int8 codes and per-row scale, zero
        # point and column offset
        return (sum(t.numel() * t.element_size() for t in (*self._packed, *extra)
                    if isinstance(t, Tensor))
                + opaque * self.out_features * (self.in_features + 20))

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N) fp32
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features).to(torch.float32))  # (M, N)
        return y.reshape(*lead, self.out_features)

    def matmul(self, x: Tensor) -> Tensor:
        """The hot path: (M, K) fp32 -> (M, N) fp32, no reshaping or module hooks."""
        if not self._ran:
            self.count_run()
        if self.input_scale is not None:
            x = x * self.input_scale
        y = self._run(x, self._packed, self.group_size, self.out_features, self.in_features)
        return y if self.bias is None else y + self.bias

    def count_run(self) -> None:
        """Count this weight's kernel as run (:func:`kernels_used`): :meth:`matmul` does, and so
        does a caller that runs the kernel itself (the scripted decode step)."""
        if not self._ran and not torch.compiler.is_compiling():
            self._ran = True
            _used[self.kernel_spec.name] += 1

    def scripted_call(self) -> ScriptedCall | None:
        """How the scripted decode step runs this linear, or None when its kernel has no
        TorchScript call or it adds a bias (those run from Python)."""
        name = self.kernel_spec.name
        if name not in SCRIPTED_KERNELS or self.bias is not None:
            return None
        empty = torch.empty(0)
        if name == "w8a8-dynamic":
            scale = empty if self.input_scale is None else self.input_scale
            return ScriptedCall(W8A8_SCRIPTED, scale, empty, self._packed[0])
        if self.input_scale is not None or not all(isinstance(t, Tensor) for t in self._packed):
            return None
        return ScriptedCall(SCRIPTED_KERNELS.index(name), self._packed[0], self._packed[-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kernel={self.kernel}, group_size={self.group_size}, nbytes={self.nbytes}")


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        got = f"{type(weight).__name__} {tuple(getattr(weight, 'shape', ()))} " \
              f"{getattr(weight, 'dtype', '')}"
        raise KernelError(f"expected a floating-point (out_features, in_features) weight, got {got}")


def _packed(kernel: Kernel, codes: Tensor, scales: Tensor | None, group_size: int,
            bias: Tensor | None, zeros: Tensor | None = None,
            input_scale: Tensor | None = None) -> PackedLinear:
    n, k = codes.shape
    tensors = kernel.pack(codes, scales, group_size, zeros)
    return PackedLinear(kernel, tensors, n, k, group_size, bias, input_scale)


def pack_linear(weight: Tensor, precision: Precision | str, *, bias: Tensor | None = None,
                group_size: int = DEFAULT_INT4_GROUP, zero_points: bool = False) -> PackedLinear:
    """Quantize a float (N, K) weight to ``precision`` and pack it for the selected kernel;
    ``zero_points``: int4 groups with a zero point each
    (:func:`quantize_int4_groups_asymmetric`)."""
    _check_weight(weight)
    precision = Precision.parse(precision)
    if zero_points:
        if precision is not Precision.INT4:
            raise KernelError(f"zero points apply to int4 groups; got precision {precision.value}")
        codes, scales, zeros = quantize_int4_groups_asymmetric(weight, group_size)
        return pack_int4_groups(codes, scales, group_size, zeros=zeros, bias=bias)
    if precision in (Precision.INT8, Precision.W8A8):
        codes, scales = quantize_int8_rows(weight)
        return pack_int8_rows(codes, scales, bias=bias, precision=precision)
    if precision is Precision.INT4:
        codes, scales = quantize_int4_groups(weight, group_size)
        return pack_int4_groups(codes, scales, group_size, bias=bias)
    return _packed(select_kernel(precision, shape=tuple(weight.shape)), weight.detach(), None, 0,
                   bias)


def _check_codes(codes: Tensor, scales: Tensor, lo: int, hi: int, scale_shape: tuple[int, ...]
                 ) -> None:
    if not isinstance(codes, Tensor) or codes.ndim != 2 or codes.dtype != torch.int8:
        raise KernelError(f"expected codes as an int8 (N, K) tensor, got "
                          f"{getattr(codes, 'dtype', type(codes).__name__)} "
                          f"{tuple(getattr(codes, 'shape', ()))}")
    if tuple(scales.shape) != scale_shape:
        raise KernelError(f"expected scales of shape {scale_shape} for codes "
                          f"{tuple(codes.shape)}, got {tuple(scales.shape)}")
    if codes.numel():   # by blocks: a mapped file's pages go back as they are read
        bounds = [block.aminmax() for _, block in row_blocks(codes)]
        low, high = min(int(b.min) for b in bounds), max(int(b.max) for b in bounds)
        if low < lo or high > hi:
            raise KernelError(f"codes must lie in [{lo}, {hi}], got [{low}, {high}]")


def pack_int8_rows(codes: Tensor, scales: Tensor, *, bias: Tensor | None = None,
                   precision: Precision = Precision.INT8, input_scale: Tensor | None = None
                   ) -> PackedLinear:
    """Existing whole-row int8 codes (N, K) (int6 codes fit too) with per-row scales (N,):
    ``W = codes * scales[:, None]``; ``precision`` W8A8 runs them with int8 activations, the
    input multiplied by ``input_scale`` (K,) first."""
    if precision not in (Precision.INT8, Precision.W8A8):
        raise KernelError(f"int8 rows run at precision int8 or w8a8, got {precision.value}")
    _check_codes(codes, scales, -128, 127, (codes.shape[0],))
    if input_scale is not None and tuple(input_scale.shape) != (codes.shape[1],):
        raise KernelError(f"expected an input scale of shape ({codes.shape[1]},), got "
                          f"{tuple(input_scale.shape)}")
    return _packed(select_kernel(precision, shape=tuple(codes.shape)), codes, scales, 0, bias,
                   input_scale=input_scale)


def pack_int4_groups(codes: Tensor, scales: Tensor, group_size: int, *,
                     zeros: Tensor | None = None, bias: Tensor | None = None) -> PackedLinear:
    """Existing int4 codes (N, K) in [-8, 7] with per-group scales (N, K // group_size) and,
    for asymmetric groups, per-group ``zeros`` of the same shape (``W = codes * scale + zero``,
    :func:`quantize_int4_groups_asymmetric`)."""
    n, k = codes.shape
    _check_group(k, group_size)
    _check_codes(codes, scales, -8, 7, (n, k // group_size))
    if zeros is not None and tuple(zeros.shape) != (n, k // group_size):
        raise KernelError(f"expected zeros of shape {(n, k // group_size)} for codes "
                          f"{tuple(codes.shape)}, got {tuple(zeros.shape)}")
    kernel = select_kernel(Precision.INT4, zero_points=zeros is not None)
    return _packed(kernel, codes, scales, group_size, bias, zeros)


def pack_int4_rows(codes: Tensor, scales: Tensor, *, bias: Tensor | None = None) -> PackedLinear:
    """Existing whole-row int4 codes (N, K) in [-8, 7] with per-row scales (N,); the row scale
    is repeated over the largest group size dividing K (exact, a few bytes per group)."""
    n, k = codes.shape
    _check_codes(codes, scales, -8, 7, (n,))
    g = int4_group_for(k)
    return pack_int4_groups(codes, scales.reshape(n, 1).expand(n, k // g).contiguous(), g, bias=bias)
