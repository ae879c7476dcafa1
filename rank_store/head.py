"""The tied LM head computed from a rung's stored form: logits = h @ W_hat^T, no row rebuilt.

A rung's row is ``unpermute(TT(v)) * col_scale + offset + coeffs[v] @ basis + sparse(v)``
(:mod:`tensorslm.rank_store.rung`), so for a hidden state h (B, d)::

    logit_v = <hp, TT(v)> + h . offset + coeffs[v] . (basis @ h) + sum_j val_vj h[idx_vj]
    with hp = (h * col_scale)[perm]      (the column scale and permutation folded into h)

:class:`CompressedHead` prepares one rung once (at load or at the first step after a switch)
and then computes each part from what the rung stores:

* whole-row groups (order 1, int8 / int6 / int4 codes with per-row scales) through the packed
  weight-only matmuls of :mod:`tensorslm.rank_store.kernels` (codes repacked into the kernel's
  layout here, counted in :attr:`CompressedHead.nbytes`); float rows (the ``full`` rung, fp16
  rows) by a plain matmul on the stored tensor, a memory map for ``full``;
* TT groups by contracting hp, reshaped to (n_1, ..., n_N), with the cores: the first step is
  one GEMM over the whole group, then batched products over the group's tokens, never a row.
  Or, where it measures cheaper (large batches, high ranks), decode the rows in chunks and
  multiply (``decode``); :attr:`TTPart.mode` says which, chosen per group by timing both at
  preparation;
* the offset as one scalar h . offset added to every logit, a shared basis as
  ``coeffs @ (basis @ h)``, a sparse residual by a gather of h.

:class:`TwoStageHead` adds exact greedy from a cheap rung: the coarse logits, a per-token bound
on each logit's error, and the candidates that could still be the argmax rescored exactly from
a finer rung (rows read by index, from the memory-mapped ``full`` table for instance). The
bound, per token v and hidden state h::

    |coarse_v - exact_v| <= ||h|| * ||e_v - e^_v|| + arithmetic_v(h)

where ``e_v - e^_v`` is the row's reconstruction error (measured once per rung pair,
:func:`row_error_norms`) and ``arithmetic_v(h)`` (:meth:`CompressedHead.arithmetic_bound`)
bounds what the coarse path's own arithmetic adds: ||delta(hp)|| * ||t_v||, with t_v the
token's stored row or TT part and delta the rounding of the activations the kernel sees (see
:func:`activation_error`), plus a float32 term for everything else.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from .core_quant import unpack_codes
from .errors import RankStoreError
from .rung import Rung, RankGroup, reconstruct_rows

log = logging.getLogger(__name__)

#: TT group evaluation: contract h with the cores, or decode rows in chunks and multiply
TT_MODES = ("auto", "contract", "decode")
#: relative error of one bf16 rounding (8 significant bits)
BF16_EPS = 2.0 ** -8
#: relative slack of a float32 matmul of length d <= 4096 (d * 2^-24 rounded up)
FP32_SLACK = 2.0 ** -12
#: floats held by one intermediate of a TT contraction chunk (bounds the memory of a step)
CHUNK_FLOATS = 1 << 21
#: the two-stage head computes the fine rung's whole head instead of gathering rows once the
#: candidates exceed 1/DENSE_RESCORE of the vocabulary
DENSE_RESCORE = 8
#: torch's int4 packing takes a number of rows that is a multiple of this
INT4_ROW_MULTIPLE = 16


class HeadError(RankStoreError, ValueError):
    """A rung or hidden state the compressed-domain head cannot serve."""


class HeadPart(Protocol):
    """One group of tokens: its logits from the folded hidden state."""

    nbytes: int  # resident bytes this part adds beyond the rung's own tensors
    kernel: str  # the kernel layer's name, or fp32 (see activation_error)

    def logits(self, hp: Tensor) -> Tensor:
        """(B, d) folded hidden states -> (B, V_g) float32 logits of the group's tokens."""
        ...

    def describe(self) -> str:
        ...

    def row_norms(self) -> Tensor:
        """(V_g,) the norm of each token's stored part t_v (rows, or the TT row)."""
        ...


# --------------------------------------------------------------------------- whole rows


def _unpack_rows(packed: Tensor, kind: str, width: int, block: int = 4096) -> Tensor:
    """Packed codes (n, bytes) -> (n, width) int8, a block of rows at a time (the unpacking's
    int32 temporaries stay small; a mapped rung's pages go back as they are read)."""
    from . import kernels

    out = torch.empty(packed.shape[0], width, dtype=torch.int8)
    for start, rows in kernels.row_blocks(packed, block):
        out[start : start + block] = unpack_codes(rows, kind, width, dim=1)
    return out


#: kernels that quantise the activations to 8 bits per call (per row, asymmetric over the row's
#: range with 0 included; 127 levels is the conservative count)
DYNAMIC_INT8 = ("w8a8-dynamic", "w8a8-dequant", "int4-dynquant")
ACTIVATION_LEVELS = 127
#: int8-planes-bf16 rounds x.(16 hi + 8) s and x.(lo - 8) s to bf16 separately and adds them:
#: the output rounding is 2^-8 ||hp|| (1 + 2^-8)^2 q_v with q_v = s (||16 hi + 8|| + ||lo - 8||)
#: >= ||t_v|| (kernels.plane_row_norms) instead of 2^-8 ||hp|| ||t_v||, so the bound adds
#: SPLIT_OUTPUT * 2^-8 ||hp|| (q_v - ||t_v||); 1.1 leaves room for the fp32 sums of d <= 5,000
SPLIT_OUTPUT = 1.1


def activation_error(kernel: str, hp: Tensor) -> Tensor:
    """(B,): a bound on ||x~ - x|| * (error per unit row norm) for the activations ``hp`` (B, d)
    as kernel ``kernel`` computes with them, so |logit error of token v| <= this * ||t_v||.

    bf16 kernels: the activations, the scales and the output are each rounded to bf16, a
    relative 2^-8 each (3.1 * 2^-8 * ||hp|| with the second-order terms; a kernel that rounds
    two products per row adds :data:`SPLIT_OUTPUT` for the second, see
    :attr:`RowsPart.split_norms`). Dynamic int8 kernels:
    each coordinate is off by at most half a step, the step being the range (0 included) over
    the levels, so sqrt(d) * step / 2, plus the bf16 scales of the int4 one. fp32: 2^-12 ||hp||.
    """
    norm = hp.norm(dim=1)
    if kernel.endswith("-bf16"):
        return 3.1 * BF16_EPS * norm
    if kernel in DYNAMIC_INT8:
        span = hp.clamp(min=0).amax(1) - hp.clamp(max=0).amin(1)  # (B,)
        return math.sqrt(hp.shape[1]) * span / (2 * ACTIVATION_LEVELS) + (2 * BF16_EPS + FP32_SLACK) * norm
    return FP32_SLACK * norm


def int8_activation_rows() -> bool:
    """Whether int8 rows can run with int8 activations here: the registry's w8a8 kernel is
    ``w8a8-dynamic`` (fbgemm with VNNI, qnnpack), not the dequantising fallback, which would
    cost more than the bf16-activation kernel it replaces."""
    from . import kernels

    return kernels.select_kernel(kernels.Precision.W8A8).name == "w8a8-dynamic"


@dataclass
class RowsPart:
    """A whole-row group: float rows by a matmul, quantised rows by a packed kernel."""

    weight: object  # float (V_g, d) tensor, or a packed kernel weight
    kind: str  # float32 | float16 | int8 | int6 | int4
    nbytes: int
    kernel: str = "fp32"
    norms: Tensor | None = None  # (V_g,) ||t_v||, computed at build
    size: int = 0  # V_g
    split_norms: Tensor | None = None  # (V_g,) q_v - ||t_v|| for int8-planes-bf16 (SPLIT_OUTPUT)
    group: str = ""  # "g<k>" for int4 rows with a scale per k coordinates

    def __post_init__(self) -> None:
        if not self.size:
            self.size = self.weight.shape[0] if isinstance(self.weight, Tensor) else self.weight.out_features

    @classmethod
    def build(cls, group: RankGroup, *, int8_activations: bool = False) -> RowsPart:
        """``int8_activations``: int8 (and int6) rows run with each hidden state quantised to
        8 bits (``w8a8-dynamic``) where this CPU has that kernel (:func:`int8_activation_rows`)."""
        from . import kernels

        core = group.cores[0]  # (V_g, 1, d, 1)
        V_g, d = core.shape[0], group.shape[0]
        kind = group.dtype_name
        if kind in ("float32", "float16"):
            weight = core.reshape(V_g, d)  # a view: the stored (or memory-mapped) table
            return cls(weight, kind, 0)
        if group.widths is not None:  # int4 / int6 codes packed along d: unpack once, here
            codes = _unpack_rows(core.reshape(V_g, -1), kind, d)  # (V_g, d) int8
        else:
            codes = core.reshape(V_g, d)  # (V_g, d) int8
        scales = group.row_scales  # (V_g, d / group_size) fp16; (V_g, 1) for one scale per row
        if kind == "int4" and any(d % g == 0 for g in kernels.INT4_GROUP_SIZES):
            pad = -V_g % INT4_ROW_MULTIPLE  # the int4 packing takes N in multiples of 16
            padded, padded_scales = codes, scales
            if pad:
                padded = torch.cat([codes, codes.new_zeros(pad, d)])
                padded_scales = torch.cat([scales, scales.new_ones(pad, scales.shape[1])])
            if group.group_size is not None:  # a scale per group_size coordinates: the grouped kernel
                packed = kernels.pack_int4_groups(padded, padded_scales, group.group_size)
            else:
                packed = kernels.pack_int4_rows(padded, padded_scales[:, 0])
        elif group.group_size is not None:
            raise HeadError(f"int4 rows with a scale per {group.group_size} coordinates need the grouped "
                            f"int4 kernel, which takes widths divisible by one of {kernels.INT4_GROUP_SIZES}; "
                            f"got d = {d}")
        else:  # int6, int8, and int4 rows of a width no int4 kernel takes (d not a multiple of 32)
            precision = (kernels.Precision.W8A8 if int8_activations and int8_activation_rows()
                         else kernels.Precision.INT8)
            packed = kernels.pack_int8_rows(codes, scales[:, 0], precision=precision)
        extra = packed.nbytes  # at most: a kernel may keep the rung's own int8 codes as its weight
        norms = torch.empty(V_g)
        G = scales.shape[1]
        for start, block in kernels.row_blocks(codes, 4096):  # the dequantised rows' norms, by blocks
            rows = block.float().reshape(-1, G, d // G) * scales[start : start + block.shape[0]].float()[:, :, None]
            norms[start : start + block.shape[0]] = rows.flatten(1).norm(dim=1)  # (b,)
        split = None
        if packed.kernel == kernels.PLANES_KERNEL:
            split = kernels.plane_row_norms(codes, group.scales[0]) - norms  # (V_g,)
            extra += split.numel() * split.element_size()
        group_name = "" if group.group_size is None else f"g{group.group_size}"
        return cls(packed, kind, extra, packed.kernel, norms, V_g, split, group_name)

    def logits(self, hp: Tensor) -> Tensor:
        if isinstance(self.weight, Tensor):
            w = self.weight
            if w.dtype != torch.float32:  # fp16 rows: converted block by block, never all at once
                out = hp.new_empty(hp.shape[0], w.shape[0])
                step = max(1, CHUNK_FLOATS // w.shape[1])
                for start in range(0, w.shape[0], step):
                    out[:, start : start + step] = hp @ w[start : start + step].float().T
                return out
            return hp @ w.T  # (B, V_g)
        out = self.weight(hp)  # (B, V_g [+ padding]) float32, through the kernel layer
        return out if out.shape[1] == self.size else out[:, : self.size]

    def describe(self) -> str:
        return f"rows/{self.kind}{self.group} via {self.kernel}"

    def row_norms(self) -> Tensor:
        if self.norms is None:  # float rows: the rows themselves, read once
            self.norms = torch.cat([self.weight[i : i + 8192].float().norm(dim=1)
                                    for i in range(0, self.size, 8192)])
        return self.norms


# --------------------------------------------------------------------------- TT groups


def _float_cores(group: RankGroup) -> tuple[list[Tensor], Tensor | None]:
    """The group's cores as int8 codes or float tensors (packed codes unpacked once) and the
    product of the per-core scales (V_g,) float32 (a row is multilinear in its cores)."""
    cores = []
    for k, core in enumerate(group.cores):
        if group.widths is not None:
            core = unpack_codes(core, group.dtype_name, group.widths[k], dim=2)  # (V_g, r, n, r') int8
        cores.append(core)
    scale = None
    if group.scales is not None:
        scale = group.scales[0].float()
        for s in group.scales[1:]:
            scale = scale * s.float()
    return cores, scale


def contract_tt(hp: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """<hp, TT(v)> for every token of the cores: hp (B, d), cores (V_g, r_{k-1}, n_k, r_k) of
    any real dtype (converted to float32 here) -> (B, V_g). Contracts from the last core: one
    GEMM over the whole group, then batched products per token; no row is formed."""
    B = hp.shape[0]
    V_g = cores[0].shape[0]
    widths = [c.shape[2] for c in cores]
    last = cores[-1]  # (V_g, r, n_N, 1)
    r = last.shape[1]
    P = math.prod(widths[:-1])
    x = hp.reshape(B * P, widths[-1])  # (B P, n_N)
    g = last.reshape(V_g * r, widths[-1]).float()  # (V_g r, n_N)
    y = (x @ g.T).reshape(B, P, V_g, r).permute(2, 0, 1, 3)  # (V_g, B, P, r)
    for k in range(len(cores) - 2, -1, -1):
        core = cores[k].float()  # (V_g, r_{k-1}, n_k, r_k)
        r_prev, n, r_next = core.shape[1:]
        P //= n
        y = y.reshape(V_g, B * P, n * r_next)  # (V_g, B P_k, n_k r_k)
        y = torch.bmm(y, core.reshape(V_g, r_prev, n * r_next).transpose(1, 2))  # (V_g, B P_k, r_{k-1})
    return y.reshape(V_g, B).T  # (B, V_g)


def _reversed(cores: Sequence[Tensor]) -> list[Tensor]:
    """The cores of the same rows read with the coordinate order reversed."""
    return [c.permute(0, 3, 2, 1) for c in reversed(cores)]


def _reverse_coords(hp: Tensor, widths: Sequence[int]) -> Tensor:
    B = hp.shape[0]
    dims = tuple(range(len(widths), 0, -1))
    return hp.reshape(B, *widths).permute(0, *dims).reshape(B, -1)


@dataclass
class TTPart:
    """A TT group: contracted with h, or decoded in chunks and multiplied, per :attr:`mode`."""

    cores: list[Tensor]  # (V_g, r_{k-1}, n_k, r_k) int8 or float
    scale: Tensor | None  # (V_g,) float32: product of the per-core scales
    widths: tuple[int, ...]
    reverse: bool  # contract from the first core (its edge rank is the smaller)
    nbytes: int
    mode: str = "contract"
    seconds: dict[str, float] = field(default_factory=dict)  # measured cost per token at B=1
    kernel: str = "fp32"

    @classmethod
    def build(cls, group: RankGroup, mode: str = "auto") -> TTPart:
        cores, scale = _float_cores(group)
        stored = sum(c.numel() * c.element_size() for c in group.cores)
        extra = sum(c.numel() * c.element_size() for c in cores) - (stored if group.widths is None else 0)
        extra += 0 if scale is None else scale.numel() * 4
        reverse = cores[0].shape[3] < cores[-1].shape[1]  # the first GEMM's cost grows with the edge rank
        part = cls(cores, scale, tuple(group.shape), reverse, extra)
        part.mode = part._measure() if mode == "auto" else mode
        return part

    def _chunk(self, B: int) -> int:
        r = max(c.shape[1] for c in self.cores)
        return max(1, CHUNK_FLOATS // max(1, B * math.prod(self.widths) * r // min(self.widths)))

    def _contract(self, hp: Tensor) -> Tensor:
        cores, widths = self.cores, self.widths
        if self.reverse:
            cores, hp = _reversed(cores), _reverse_coords(hp, widths)
        V_g = cores[0].shape[0]
        out = hp.new_empty(hp.shape[0], V_g)
        step = self._chunk(hp.shape[0])
        for start in range(0, V_g, step):  # chunks of tokens bound the intermediates' memory
            out[:, start : start + step] = contract_tt(hp, [c[start : start + step] for c in cores])
        return out

    def _decode(self, hp: Tensor) -> Tensor:
        from .tt import contract

        V_g = self.cores[0].shape[0]
        out = hp.new_empty(hp.shape[0], V_g)
        step = max(1, CHUNK_FLOATS // hp.shape[1])
        for start in range(0, V_g, step):
            rows = contract([c[start : start + step].float() for c in self.cores])  # (c, d)
            out[:, start : start + step] = hp @ rows.T
        return out

    def logits(self, hp: Tensor) -> Tensor:
        mode = self.mode
        if mode == "auto-batch":  # contraction's cost grows with B, decoding's hardly
            mode = "contract" if hp.shape[0] * self.seconds["contract"] < self.seconds["decode"] else "decode"
        out = self._contract(hp) if mode == "contract" else self._decode(hp)
        return out.mul_(self.scale) if self.scale is not None else out

    def _measure(self, sample: int = 2048, repeats: int = 3) -> str:
        """Time both ways at B = 1 on the first ``sample`` tokens; returns ``auto-batch`` (the
        choice is made per call from the batch size) with the per-token seconds kept."""
        probe = TTPart([c[:sample] for c in self.cores], None, self.widths, self.reverse, 0)
        h = torch.randn(1, math.prod(self.widths))
        n = probe.cores[0].shape[0]
        for name, run in (("contract", probe._contract), ("decode", probe._decode)):
            run(h)  # warm
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                run(h)
                best = min(best, time.perf_counter() - t0)
            self.seconds[name] = best / n
        return "auto-batch"

    def row_norms(self) -> Tensor:
        from .tt import contract

        V_g = self.cores[0].shape[0]
        step = max(1, CHUNK_FLOATS // math.prod(self.widths))
        norms = torch.cat([contract([c[i : i + step].float() for c in self.cores]).norm(dim=1)
                           for i in range(0, V_g, step)])
        return norms if self.scale is None else norms * self.scale.abs()

    def describe(self) -> str:
        ranks = "x".join(str(c.shape[3]) for c in self.cores[:-1])
        if self.seconds:
            return (f"tt {ranks} ({self.cores[0].dtype}) contract {self.seconds['contract'] * 1e9:.0f} ns/token, "
                    f"decode {self.seconds['decode'] * 1e9:.0f} ns/token at B=1")
        return f"tt {ranks} ({self.cores[0].dtype}) {self.mode}"


# --------------------------------------------------------------------------- the rung


class CompressedHead:
    """``h @ W_hat^T`` from one rung's stored form; see the module docstring.

    ``tt_mode``: ``auto`` (time contraction and decoding per TT group, then choose per call
    by batch size), ``contract`` or ``decode``.
    """

    def __init__(self, rung: Rung, *, tt_mode: str = "auto", int8_activations: bool = False
                 ) -> None:
        if tt_mode not in TT_MODES:
            raise HeadError(f"tt_mode must be one of {', '.join(TT_MODES)}, got {tt_mode!r}")
        started = time.perf_counter()
        self.rung = rung
        self.vocab_size, self.dim = rung.vocab_size, rung.dim
        parts: list[HeadPart] = []
        for group in rung.groups:
            if group.size == 0:
                parts.append(None)
            elif len(group.cores) == 1:
                parts.append(RowsPart.build(group, int8_activations=int8_activations))
            else:
                parts.append(TTPart.build(group, tt_mode))
        self.parts = parts
        self.ids = [None if g.token_ids is None else g.token_ids.long() for g in rung.groups]  # (V_g,) each
        fold = rung.col_scale.float() if rung.col_scale is not None else None
        self._col_scale = fold  # (d,)
        self._perm = rung.perm  # (d,) int64
        self._offset = None if rung.offset is None else rung.offset.float()  # (d,)
        self._basis = None if rung.basis is None else rung.basis.float()  # (k, d)
        self._coeffs_t = None if rung.coeffs is None else rung.coeffs.float().T.contiguous()  # (k, V)
        self._sparse_idx = None if rung.sparse_idx is None else rung.sparse_idx.reshape(-1).int()  # (V s,)
        self._sparse_val = None if rung.sparse_val is None else rung.sparse_val.float()  # (V, s)
        converted = [t for t in (self._offset, self._basis, self._coeffs_t, self._sparse_idx, self._sparse_val)
                     if t is not None]
        self.nbytes = sum(p.nbytes for p in parts if p is not None) + sum(t.numel() * t.element_size()
                                                                         for t in converted)
        self._norms: Tensor | None = None
        self.seconds = time.perf_counter() - started
        log.info("compressed head prepared in %.2f s: %s", self.seconds, self.describe())

    @property
    def packs_own_copy(self) -> bool:
        """Every group is whole rows held by a kernel in a copy of its own: the head reads none
        of the rung's codes in place, so the rung's pages are needed only for lookups."""
        for part, group in zip(self.parts, self.rung.groups):
            if part is None:
                continue
            if not isinstance(part, RowsPart) or isinstance(part.weight, Tensor) \
                    or part.weight.shares_memory_with(group.cores[0]):
                return False
        return True

    def describe(self) -> str:
        kinds: dict[str, int] = {}
        for part, group in zip(self.parts, self.rung.groups):
            if part is not None:
                kinds[part.describe()] = kinds.get(part.describe(), 0) + group.size
        return "; ".join(f"{k}: {n} tokens" for k, n in kinds.items())

    def part_norms(self) -> Tensor:
        """(V,): ||t_v||, the norm of each token's stored part (its group's row or TT row), and
        of the float parts (offset, basis, sparse) added: what the arithmetic error scales with."""
        if self._norms is None:
            norms = torch.zeros(self.vocab_size)
            for part, ids in zip(self.parts, self.ids):
                if part is not None:
                    norms = part.row_norms() if ids is None else norms.index_copy_(0, ids, part.row_norms())
            self._norms = norms
            extra = torch.zeros(self.vocab_size)
            if self._offset is not None:
                extra += self._offset.norm()
            if self._basis is not None:
                extra += self._coeffs_t.norm(dim=0) * torch.linalg.matrix_norm(self._basis, ord=2)
            if self._sparse_val is not None:
                extra += self._sparse_val.norm(dim=1)
            self._extra_norms = extra
        return self._norms

    def arithmetic_bound(self, hidden: Tensor) -> Tensor:
        """(B, V): a bound on |this head's logit - the exact product with the rung's rows| for
        hidden states (B, d), from each part's kernel (:func:`activation_error`)."""
        h = hidden.reshape(-1, self.dim).float()
        hp = self.fold(h)
        norms = self.part_norms()
        out = torch.empty(h.shape[0], self.vocab_size)
        for part, ids in zip(self.parts, self.ids):
            if part is not None:
                per = activation_error(part.kernel, hp)[:, None]  # (B, 1)
                cols = norms if ids is None else norms.index_select(0, ids)
                term = per * cols  # (B, V_g)
                if isinstance(part, RowsPart) and part.split_norms is not None:
                    term += SPLIT_OUTPUT * BF16_EPS * hp.norm(dim=1, keepdim=True) * part.split_norms
                if ids is None:
                    out = term
                else:
                    out.index_copy_(1, ids, term)
        return out + FP32_SLACK * h.norm(dim=1, keepdim=True) * self._extra_norms

    def fold(self, h: Tensor) -> Tensor:
        """(B, d) -> the hidden state the groups see: (h * col_scale)[:, perm]."""
        hp = h if self._col_scale is None else h * self._col_scale
        return hp if self._perm is None else hp.index_select(1, self._perm)

    def __call__(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (..., V) float32 logits."""
        if hidden.shape[-1] != self.dim:
            raise HeadError(f"hidden states must end in d = {self.dim}, got shape {tuple(hidden.shape)}")
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, self.dim).float()  # (B, d)
        hp = self.fold(h).contiguous()
        if len(self.parts) == 1 and self.ids[0] is None:
            out = self.parts[0].logits(hp)  # (B, V)
        else:
            out = h.new_empty(h.shape[0], self.vocab_size)  # (B, V)
            for part, ids in zip(self.parts, self.ids):  # loop over groups, never tokens
                if part is not None:
                    out.index_copy_(1, ids, part.logits(hp))
        if self._offset is not None:
            out.add_(h @ self._offset[:, None])  # (B, 1): one scalar per hidden state
        if self._basis is not None:
            out.addmm_(h @ self._basis.T, self._coeffs_t)  # (B, k) @ (k, V)
        if self._sparse_idx is not None:
            V, s = self._sparse_val.shape
            gathered = h.index_select(1, self._sparse_idx).reshape(-1, V, s)  # (B, V, s)
            out.add_((gathered * self._sparse_val).sum(-1))
        return out.reshape(*lead, self.vocab_size)


def reconstructed_logits(rung: Rung, hidden: Tensor, block: int = 8192) -> Tensor:
    """The reference: rows rebuilt with :func:`reconstruct_rows`, then a matmul. (B, d) -> (B, V)."""
    out = hidden.new_empty(hidden.shape[0], rung.vocab_size, dtype=torch.float32)
    for start in range(0, rung.vocab_size, block):
        rows = reconstruct_rows(rung, torch.arange(start, min(start + block, rung.vocab_size)))  # (b, d)
        out[:, start : start + rows.shape[0]] = hidden.float() @ rows.T
    return out


# --------------------------------------------------------------------------- two stages


def row_error_norms(coarse: Rung, fine: Rung, block: int = 8192) -> Tensor:
    """(V,) float32: ||e_v - e^_v||, the fine row minus the coarse one, per token (measured once
    per pair of rungs, rows rebuilt block by block)."""
    if (coarse.vocab_size, coarse.dim) != (fine.vocab_size, fine.dim):
        raise HeadError(f"the rungs differ in size: {coarse.vocab_size}x{coarse.dim} against "
                        f"{fine.vocab_size}x{fine.dim}")
    error = torch.empty(coarse.vocab_size)
    for start in range(0, coarse.vocab_size, block):
        ids = torch.arange(start, min(start + block, coarse.vocab_size))
        error[ids] = (reconstruct_rows(fine, ids) - reconstruct_rows(coarse, ids)).norm(dim=1)
    return error


@dataclass
class RescoreStats:
    """What the two-stage head rescored: candidates per step, against the vocabulary."""

    vocab_size: int
    steps: int = 0
    rescored: int = 0
    fractions: list[float] = field(default_factory=list)  # per step (one hidden state)

    def record(self, counts: Sequence[int]) -> None:
        for n in counts:
            self.steps += 1
            self.rescored += int(n)
            self.fractions.append(int(n) / self.vocab_size)

    @property
    def mean_fraction(self) -> float:
        return self.rescored / (self.steps * self.vocab_size) if self.steps else 0.0


class TwoStageHead:
    """Coarse logits from a :class:`CompressedHead`, the candidates that could be the argmax
    rescored exactly from a finer rung; see the module docstring for the bound.

    ``top_k`` replaces the provable candidate set by the ``top_k`` largest coarse logits (not
    exact in general; its agreement with the fine rung is measured, not proved). Other logits
    keep their coarse values, so sampling sees the coarse distribution with the candidates'
    exact values.
    """

    def __init__(self, coarse: CompressedHead, fine: Rung, *, errors: Tensor | None = None,
                 top_k: int | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise HeadError(f"top_k must be >= 1, got {top_k}")
        self.coarse = coarse
        self.fine = fine
        self.top_k = top_k
        self.error = errors if errors is not None else row_error_norms(coarse.rung, fine)  # (V,)
        coarse.part_norms()  # computed once, here
        self.stats = RescoreStats(coarse.vocab_size)
        self._fine_head: CompressedHead | None = None  # built only if candidates ever exceed 1/DENSE_RESCORE

    @property
    def nbytes(self) -> int:
        return self.coarse.nbytes + 3 * 4 * self.coarse.vocab_size  # + errors and norms

    @property
    def packs_own_copy(self) -> bool:
        """As :attr:`CompressedHead.packs_own_copy` for the coarse rung (the fine one is read
        a few candidate rows at a time)."""
        return self.coarse.packs_own_copy

    def candidates(self, logits: Tensor, h: Tensor) -> Tensor:
        """(B, V) bool: tokens whose upper bound reaches the best lower bound, per hidden state."""
        if self.top_k is not None:
            k = min(self.top_k, logits.shape[1])
            mask = torch.zeros_like(logits, dtype=torch.bool)
            return mask.scatter_(1, logits.topk(k, dim=1).indices, True)
        bound = h.norm(dim=1, keepdim=True) * self.error + self.coarse.arithmetic_bound(h)  # (B, V)
        best_low = (logits - bound).amax(dim=1, keepdim=True)  # (B, 1)
        return logits + bound >= best_low

    def __call__(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (..., V) float32: coarse logits, candidates exact."""
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, self.coarse.dim).float()  # (B, d)
        logits = self.coarse(h)  # (B, V)
        mask = self.candidates(logits, h)
        self.stats.record(mask.sum(1).tolist())
        ids = mask.any(0).nonzero().squeeze(1)  # (n,) the union over the batch
        if ids.numel() * DENSE_RESCORE > self.coarse.vocab_size:  # a loose bound: the fine head whole
            if self._fine_head is None:
                self._fine_head = CompressedHead(self.fine)
            exact = self._fine_head(h).index_select(1, ids)  # (B, n)
        else:
            exact = h @ reconstruct_rows(self.fine, ids).T  # (B, n): fine rows read by index only
        logits.index_copy_(1, ids, exact)
        return logits.reshape(*lead, self.coarse.vocab_size)
