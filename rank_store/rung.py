"""A rung: everything needed to rebuild the rows of one compressed embedding table.

Data model (all parts but the groups are optional; a plain TT rung uses one group only):

``shape`` (n_1..n_N), prod = d
    how each token vector was tensorised.
groups
    tokens grouped by TT rank signature. Group g has ranks (1, r_1, ..., r_{N-1}, 1) and
    cores ``group{g}.core{k}`` of shape (V_g, r_{k-1}, n_k, r_k) in float32, float16, int8,
    or int4/int6 stored as uint8 packed along n_k (int4: two codes per byte, shape (V_g, r_{k-1},
    ceil(n_k / 2), r_k), low nibble first; int6: four codes per three bytes, shape (V_g, r_{k-1},
    3 ceil(n_k / 4), r_k); the header's ``packed_bits`` says which). Quantised cores carry per-(token, core) float16
    scales ``group{g}.scale{k}`` (V_g,), and are dequantised at lookup as q * scale. A group may
    also be order 1, one core (V_g, 1, d, 1): those tokens are stored as whole rows. Whole int4
    rows may carry one scale per ``group_size`` consecutive coordinates instead of one per row:
    ``group{g}.scale0`` is then (V_g, d / group_size) float16 (the header's ``scale_groups``
    says which groups, and the size).
``group_of`` (V,) uint8 (int16 beyond 255 groups)
    the group of every token, stored only when there are several groups. A group holds its
    tokens in ascending id order, so each group's token ids and each token's row within its
    group are derived from ``group_of`` when the rung is loaded (1 byte per token on disk).
``perm`` (d,) int64
    the coordinate order that was tensorised: the cores approximate R[:, perm] where R is
    the table minus offset and shared basis part. Lookup puts coordinates back.
``col_scale`` (d,)
    multiplies each coordinate after unpermuting (the table was divided by it per coordinate
    before decomposing).
``offset`` (d,)
    added to every row (mean removal).
``basis`` (k, d) with ``coeffs`` (V, k)
    a shared basis: row += coeffs[id] @ basis.
``sparse_idx`` (V, s) int16 and ``sparse_val`` (V, s) float16
    a sparse residual, added in the original coordinates after everything else.

So a row is  unpermute(TT(id)) * col_scale + offset + coeffs[id] @ basis + sparse(id).

Bytes: :attr:`Rung.nbytes` counts every tensor the rung stores (cores, scales, group map,
perm, column scale, offset, basis, coeffs, sparse indices and values); the compression ratio is
V * d * 4 / nbytes, against the fp32 table. Parameters (:attr:`Rung.num_params`) count the
stored real values (cores, column scale, offset, basis, coeffs, sparse values), not indices or
per-token scales.

Lookup (:func:`reconstruct_rows`) gathers the requested rows' cores and contracts them with
batched matrix products; it loops over rank groups at most, never over tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .core_quant import CoreDtype, pack_codes, packed_length, quantize_core, unpack_codes
from .errors import RungFormatError, TokenIndexError
from .kernels import INT4_CLIP_RATIOS, best_int4_scales
from .tt import TTCores, contract

FLOAT_DTYPES = (torch.float32, torch.float16)
#: torch.uint8 cores hold packed int4 or int6 codes along n_k
CORE_DTYPES = (torch.float32, torch.float16, torch.int8, torch.uint8)
QUANTISED = (torch.int8, torch.uint8)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int8: "int8"}
PACKED_BITS = (4, 6)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RungFormatError(message)


def _check_covers(token_ids: Tensor, vocab_size: int) -> None:
    ids = token_ids.long()
    _check(ids.numel() == vocab_size and torch.equal(torch.sort(ids).values, torch.arange(vocab_size)),
           f"the groups' token_ids must cover each of the {vocab_size} tokens exactly once")


def group_map_dtype(num_groups: int) -> torch.dtype:
    """The dtype of ``group_of`` for a rung of ``num_groups`` groups: uint8 up to 255, else int16."""
    _check(num_groups <= torch.iinfo(torch.int16).max, f"at most 32767 groups, got {num_groups}")
    return torch.uint8 if num_groups <= torch.iinfo(torch.uint8).max else torch.int16


@dataclass(frozen=True, eq=False)  # tensors: identity, not element-wise, equality
class RankGroup:
    """Tokens sharing one rank signature: cores (V_g, r_{k-1}, n_k, r_k), optional ids and scales.

    Packed cores (uint8 along n_k) need ``widths``, the unpacked n_k of each core, and ``bits``
    (4 or 6) per code. ``group_size``: whole int4 rows with one scale per ``group_size``
    coordinates, ``scales[0]`` (V_g, d / group_size) float16.
    """

    cores: tuple[Tensor, ...]
    token_ids: Tensor | None = None  # (V_g,) int32; None = every token of the rung, in order
    scales: tuple[Tensor, ...] | None = None  # per core (V_g,) float16, int8/int6/int4 cores only
    widths: tuple[int, ...] | None = None  # n_k per core, packed cores only
    bits: int = 4  # bits per code of packed cores
    group_size: int | None = None  # whole int4 rows: coordinates per scale (scales[0] (V_g, d / group_size))

    def __post_init__(self) -> None:
        cores = tuple(self.cores)
        object.__setattr__(self, "cores", cores)
        TTCores(cores)  # validates the chain of ranks
        dtypes = {c.dtype for c in cores}
        _check(
            len(dtypes) == 1 and cores[0].dtype in CORE_DTYPES,
            f"cores of a group must share one dtype among float32, float16, int8, uint8 (int4/int6); "
            f"got {sorted(map(str, dtypes))}",
        )
        size = cores[0].shape[0]
        if cores[0].dtype == torch.uint8:
            _check(self.bits in PACKED_BITS, f"packed cores hold 4 or 6 bits per code, got {self.bits}")
            _check(self.widths is not None and len(self.widths) == len(cores),
                   f"int{self.bits} cores need their unpacked widths n_k, one per core ({len(cores)})")
            widths = tuple(int(n) for n in self.widths)
            object.__setattr__(self, "widths", widths)
            for k, (core, n) in enumerate(zip(cores, widths)):
                nbytes = packed_length(n, f"int{self.bits}")
                _check(core.shape[2] == nbytes,
                       f"int{self.bits} core {k} packs n_{k + 1} = {n} codes into {nbytes} bytes, got {core.shape[2]}")
        else:
            _check(self.widths is None, f"widths are only valid with packed (uint8) cores, cores are {cores[0].dtype}")
        if cores[0].dtype in QUANTISED:
            _check(self.scales is not None and len(self.scales) == len(cores),
                   f"int8/int6/int4 cores need one float16 scale vector per core ({len(cores)}), got "
                   f"{0 if self.scales is None else len(self.scales)}")
            scales = tuple(self.scales)
            object.__setattr__(self, "scales", scales)
            if self.group_size is not None:
                d = self.shape[0]
                _check(len(cores) == 1 and self.widths is not None and self.bits == 4,
                       f"scale groups are for whole int4 rows (one packed core), got {len(cores)} "
                       f"{self.dtype_name} cores")
                _check(self.group_size > 0 and d % self.group_size == 0,
                       f"group_size must divide the row width {d}, got {self.group_size}")
                expected = (size, d // self.group_size)
            else:
                expected = (size,)
            for k, s in enumerate(scales):
                _check(tuple(s.shape) == expected and s.dtype == torch.float16,
                       f"scale {k} must be float16 of shape {expected}, got {s.dtype} {tuple(s.shape)}")
        else:
            _check(self.scales is None, f"scales are only valid with int8/int6/int4 cores, cores are {cores[0].dtype}")
            _check(self.group_size is None, f"scale groups are for whole int4 rows, cores are {cores[0].dtype}")
        if self.token_ids is not None:
            _check(self.token_ids.shape == (size,) and self.token_ids.dtype == torch.int32,
                   f"token_ids must be int32 of shape ({size},), got {self.token_ids.dtype} "
                   f"{tuple(self.token_ids.shape)}")

    @classmethod
    def quantize(cls, cores: Sequence[Tensor], dtype: CoreDtype | str, token_ids: Tensor | None = None,
                 *, pack: bool = True, group_size: int | None = None) -> RankGroup:
        """Float cores (V_g, r_{k-1}, n_k, r_k) stored as ``dtype``: fp32, fp16, or int8/int6/int4
        codes with per-(token, core) fp16 scales (int6 and int4 packed along n_k). ``pack=False``
        keeps int6/int4 codes one per byte: the same rows, rebuilt faster, but not the stored bytes.
        ``group_size``: whole int4 rows (one core (V_g, 1, d, 1)) with one scale per
        ``group_size`` coordinates (:func:`quantize_row_groups`)."""
        kind = CoreDtype(dtype)
        if group_size is not None:
            _check(kind is CoreDtype.INT4 and len(cores) == 1 and cores[0].shape[1] == cores[0].shape[3] == 1,
                   f"scale groups are for whole int4 rows (one core (V_g, 1, d, 1)), got {len(cores)} "
                   f"{kind.value} cores of shape {tuple(cores[0].shape)}")
            V_g, d = cores[0].shape[0], cores[0].shape[2]
            codes, scales = quantize_row_groups(cores[0].reshape(V_g, d), group_size)  # (V_g, d), (V_g, d/g)
            ids = None if token_ids is None else token_ids.to(torch.int32)
            return cls((pack_codes(codes, kind, dim=1).reshape(V_g, 1, -1, 1),), token_ids=ids, scales=(scales,),
                       widths=(d,), bits=4, group_size=group_size)
        pairs = [quantize_core(c, kind) for c in cores]
        codes = tuple(q for q, _ in pairs)
        widths = None
        if kind.packed and pack:
            widths = tuple(q.shape[2] for q in codes)  # n_k, unpacked
            codes = tuple(pack_codes(q, kind, dim=2) for q in codes)  # (V_g, r_{k-1}, packed n_k, r_k) uint8
        scales = tuple(s for _, s in pairs) if kind.qmax else None  # per core (V_g,) fp16
        ids = None if token_ids is None else token_ids.to(torch.int32)
        return cls(codes, token_ids=ids, scales=scales, widths=widths, bits=kind.bits if widths else 4)

    @property
    def ranks(self) -> tuple[int, ...]:
        return TTCores(self.cores).ranks

    @property
    def row_scales(self) -> Tensor:
        """Whole quantised rows: the scale of every coordinate's group, (V_g, d / group_size)
        float16 ((V_g, 1) with one scale per row)."""
        _check(len(self.cores) == 1 and self.scales is not None, "row scales are for whole quantised rows")
        return self.scales[0] if self.group_size is not None else self.scales[0][:, None]

    @property
    def dtype_name(self) -> str:
        """float32, float16, int8, int6 or int4."""
        return f"int{self.bits}" if self.widths is not None else _DTYPE_NAMES[self.dtype]

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensorisation (n_1..n_N) of this group's tokens (unpacked widths when packed)."""
        return self.widths if self.widths is not None else tuple(c.shape[2] for c in self.cores)

    @property
    def size(self) -> int:
        return self.cores[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.cores[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the stored cores (packed as stored) and scales."""
        return sum(t.numel() * t.element_size() for t in (*self.cores, *(self.scales or ())))

    def reordered(self, order: Tensor, token_ids: Tensor | None) -> RankGroup:
        """The group with its tokens taken in ``order`` (positions within the group), naming ``token_ids``."""
        scales = None if self.scales is None else tuple(s.index_select(0, order) for s in self.scales)  # (V_g,) each
        cores = tuple(c.index_select(0, order) for c in self.cores)  # (V_g, r_{k-1}, n_k, r_k) each
        return RankGroup(cores, token_ids, scales, self.widths, self.bits, self.group_size)

    def rows(self, rows: Tensor) -> Tensor:
        """Rows (positions within the group) rebuilt in float32: (n, d) in tensorised coordinates."""
        gathered = []
        for k, core in enumerate(self.cores):
            g = core.index_select(0, rows)  # (n, r_{k-1}, n_k, r_k); packed along n_k
            if self.widths is not None:
                g = unpack_codes(g, f"int{self.bits}", self.widths[k], dim=2, out=torch.float32)
            else:
                g = g.float()
            gathered.append(g)
        out = contract(gathered)  # (n, d)
        if self.group_size is not None:  # whole rows, one scale per group of coordinates
            scale = self.scales[0].index_select(0, rows).float()  # (n, d / group_size)
            out.view(out.shape[0], -1, self.group_size).mul_(scale[:, :, None])
        elif self.scales is not None:  # the row is multilinear in the cores: one product of scales
            scale = self.scales[0].index_select(0, rows).float()  # (n,)
            for s in self.scales[1:]:
                scale.mul_(s.index_select(0, rows))
            out.mul_(scale[:, None])
        return out


@dataclass(frozen=True, eq=False)
class Rung:
    """One compressed table; see the module docstring for the format."""

    shape: tuple[int, ...]
    vocab_size: int
    groups: tuple[RankGroup, ...]
    group_of: Tensor | None = None  # (V,) uint8 or int16
    perm: Tensor | None = None  # (d,) int64
    col_scale: Tensor | None = None  # (d,)
    offset: Tensor | None = None  # (d,)
    basis: Tensor | None = None  # (k, d)
    coeffs: Tensor | None = None  # (V, k)
    sparse_idx: Tensor | None = None  # (V, s) int16
    sparse_val: Tensor | None = None  # (V, s) float16
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "groups", tuple(self.groups))
        V, d = self.vocab_size, self.dim
        _check(len(self.groups) >= 1, "a rung needs at least one rank group")
        for g, group in enumerate(self.groups):
            _check(group.size == 0 or group.shape in (self.shape, (d,)),
                   f"group {g} has tensor shape {group.shape}, the rung has {self.shape} (or ({d},) for whole rows)")
        self._index_groups()
        inverse = None
        if self.perm is not None:
            _check(self.perm.shape == (d,) and self.perm.dtype == torch.int64, f"perm must be int64 of shape ({d},)")
            _check(torch.equal(torch.sort(self.perm).values, torch.arange(d)), f"perm must be a permutation of 0..{d - 1}")
            inverse = torch.argsort(self.perm)  # (d,)
        object.__setattr__(self, "_inverse_perm", inverse)
        if self.col_scale is not None:
            _check(self.col_scale.shape == (d,) and self.col_scale.dtype in FLOAT_DTYPES,
                   f"col_scale must be float32/float16 of shape ({d},), got {self.col_scale.dtype} "
                   f"{tuple(self.col_scale.shape)}")
        if self.offset is not None:
            _check(self.offset.shape == (d,) and self.offset.dtype in FLOAT_DTYPES,
                   f"offset must be float32/float16 of shape ({d},), got {self.offset.dtype} {tuple(self.offset.shape)}")
        _check((self.basis is None) == (self.coeffs is None), "basis and coeffs come together")
        if self.basis is not None:
            k = self.basis.shape[0]
            _check(self.basis.dim() == 2 and self.basis.shape[1] == d and self.basis.dtype in FLOAT_DTYPES,
                   f"basis must be float32/float16 of shape (k, {d}), got {tuple(self.basis.shape)}")
            _check(self.coeffs.shape == (V, k) and self.coeffs.dtype in FLOAT_DTYPES,
                   f"coeffs must be float32/float16 of shape ({V}, {k}), got {tuple(self.coeffs.shape)}")
        _check((self.sparse_idx is None) == (self.sparse_val is None), "sparse_idx and sparse_val come together")
        if self.sparse_idx is not None:
            _check(self.sparse_idx.dim() == 2 and self.sparse_idx.shape[0] == V and self.sparse_idx.dtype == torch.int16,
                   f"sparse_idx must be int16 of shape ({V}, s), got {self.sparse_idx.dtype} {tuple(self.sparse_idx.shape)}")
            _check(self.sparse_val.shape == self.sparse_idx.shape and self.sparse_val.dtype == torch.float16,
                   f"sparse_val must be float16 of shape {tuple(self.sparse_idx.shape)}")
            if self.sparse_idx.numel():
                _check(int(self.sparse_idx.min()) >= 0 and int(self.sparse_idx.max()) < d,
                       f"sparse_idx must lie in 0..{d - 1}")
        object.__setattr__(self, "meta", {str(k): str(v) for k, v in dict(self.meta).items()})

    def _index_groups(self) -> None:
        """Check that the groups cover the vocabulary; set group_of, groups' token_ids (ascending)
        and the private row_in_group map the lookup uses."""
        V = self.vocab_size
        G = len(self.groups)
        only = self.groups[0]
        if G == 1 and only.token_ids is not None and self.group_of is None:  # one group: no map needed
            _check_covers(only.token_ids, V)
            only = only.reordered(torch.argsort(only.token_ids.long()), None)
            object.__setattr__(self, "groups", (only,))
        if G == 1 and only.token_ids is None and self.group_of is None:
            _check(self.groups[0].size == V, f"the single group holds {self.groups[0].size} tokens, vocabulary is {V}")
            object.__setattr__(self, "_row_in_group", None)
            return
        map_dtype = group_map_dtype(G)
        groups = list(self.groups)
        if self.group_of is None:  # built in memory: every group names its tokens
            _check(all(g.token_ids is not None for g in groups), "with several groups every group needs token_ids")
            _check_covers(torch.cat([g.token_ids for g in groups]), V)
            group_of = torch.empty(V, dtype=map_dtype)
            for g, group in enumerate(groups):  # loop over groups, not tokens
                group_of[group.token_ids.long()] = g
            object.__setattr__(self, "group_of", group_of)
        else:  # loaded: the map names the tokens of every group
            _check(self.group_of.shape == (V,) and self.group_of.dtype == map_dtype,
                   f"group_of must be {map_dtype} of shape ({V},) for {G} groups, got {self.group_of.dtype} "
                   f"{tuple(self.group_of.shape)}")
            _check(V == 0 or int(self.group_of.max()) < G, f"group_of names a group beyond the {G} stored")
        group_of = self.group_of.long()
        row_in_group = torch.empty(V, dtype=torch.int32)
        for g, group in enumerate(groups):  # ascending ids: the stored order is the id order
            ids = (group_of == g).nonzero().squeeze(1)  # (V_g,)
            _check(ids.numel() == group.size, f"group {g} holds {group.size} tokens, group_of gives it {ids.numel()}")
            if group.token_ids is not None and not torch.equal(group.token_ids.long(), ids):
                group = group.reordered(torch.argsort(group.token_ids.long()), ids.to(torch.int32))  # ascending ids
            elif group.token_ids is None:
                group = dataclasses.replace(group, token_ids=ids.to(torch.int32))
            groups[g] = group
            row_in_group[ids] = torch.arange(ids.numel(), dtype=torch.int32)  # (V_g,) positions in the group
        object.__setattr__(self, "groups", tuple(groups))
        object.__setattr__(self, "_row_in_group", row_in_group)

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def dense(cls, weight: Tensor, **meta: str) -> Rung:
        """The uncompressed table as an order-1 rung (one core (V, 1, d, 1), a view of weight)."""
        if weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
            raise RungFormatError(f"a dense table must be float32/float16 of shape (V, d), got {weight.dtype} "
                                  f"{tuple(weight.shape)}")
        V, d = weight.shape
        return cls((d,), V, (RankGroup((weight.reshape(V, 1, d, 1),)),), meta=meta)

    @classmethod
    def from_tt(cls, cores: TTCores, **meta: str) -> Rung:
        """A plain rung: one group of stacked cores covering the whole vocabulary."""
        return cls(cores.shape, cores.vocab_size, (RankGroup(cores.cores),), meta=meta)

    @classmethod
    def from_groups(cls, groups: Mapping[tuple[int, ...], tuple[Tensor, TTCores]], vocab_size: int,
                    **meta: str) -> Rung:
        """A rung from rank-signature groups as returned by :func:`tensorslm.rank_store.tt.tt_svd_tolerance`."""
        built = [RankGroup(c.cores, token_ids=ids.to(torch.int32)) for ids, c in groups.values()]
        if not built:
            raise RungFormatError("no groups given")
        shape = TTCores(built[0].cores).shape
        if len(built) == 1 and torch.equal(built[0].token_ids.long(), torch.arange(vocab_size)):
            built = [RankGroup(built[0].cores)]
        return cls(shape, vocab_size, tuple(built), meta=meta)

    # -- description ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def is_dense(self) -> bool:
        return len(self.shape) == 1 and len(self.groups) == 1 and self.groups[0].token_ids is None

    @property
    def ranks(self) -> tuple[int, ...] | None:
        """Inner ranks (r_1..r_{N-1}) when every token shares them, else None."""
        return self.groups[0].ranks[1:-1] if len(self.groups) == 1 else None

    @property
    def dtype(self) -> str:
        names = {g.dtype_name for g in self.groups}
        return names.pop() if len(names) == 1 else "mixed"

    def tensors(self) -> dict[str, Tensor]:
        """Every stored tensor by its safetensors name (contiguous)."""
        out: dict[str, Tensor] = {}
        for g, group in enumerate(self.groups):
            for k, core in enumerate(group.cores):
                out[f"group{g}.core{k}"] = core
            for k, scale in enumerate(group.scales or ()):
                out[f"group{g}.scale{k}"] = scale
        for name in ("group_of", "perm", "col_scale", "offset", "basis", "coeffs", "sparse_idx", "sparse_val"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return {name: t.contiguous() for name, t in out.items()}

    def metadata(self) -> dict[str, str]:
        """String metadata stored in the safetensors header; enough to rebuild with from_tensors."""
        return {
            "format": "tensorslm-rung",
            "shape": "x".join(map(str, self.shape)),
            "vocab_size": str(self.vocab_size),
            "num_groups": str(len(self.groups)),
            "packed_bits": json.dumps({str(g): group.bits for g, group in enumerate(self.groups)
                                       if group.widths is not None}),
            "scale_groups": json.dumps({str(g): group.group_size for g, group in enumerate(self.groups)
                                        if group.group_size is not None}),
            "meta": json.dumps(self.meta, sort_keys=True),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> Rung:
        """Rebuild a rung from :meth:`tensors` and :meth:`metadata` (as read from safetensors)."""
        try:
            shape = tuple(int(n) for n in meta["shape"].split("x"))
            vocab_size = int(meta["vocab_size"])
            num_groups = int(meta["num_groups"])
            extra = json.loads(meta.get("meta", "{}"))
            packed_bits = {int(g): int(b) for g, b in json.loads(meta.get("packed_bits", "{}")).items()}
            scale_groups = {int(g): int(n) for g, n in json.loads(meta.get("scale_groups", "{}")).items()}
        except (KeyError, ValueError, AttributeError) as exc:
            raise RungFormatError(f"rung metadata needs shape, vocab_size and num_groups; got {dict(meta)} ({exc})") from None
        known = {"group_of", "perm", "col_scale", "offset", "basis", "coeffs", "sparse_idx", "sparse_val"}
        groups, used = [], set()
        for g in range(num_groups):
            cores, scales, k = [], [], 0
            while f"group{g}.core{k}" in tensors:
                cores.append(tensors[f"group{g}.core{k}"])
                if f"group{g}.scale{k}" in tensors:
                    scales.append(tensors[f"group{g}.scale{k}"])
                k += 1
            if not cores:
                raise RungFormatError(f"group {g} of {num_groups} has no cores (expected tensor 'group{g}.core0')")
            widths = None
            if cores[0].dtype == torch.uint8:  # packed: the widths are the rung's shape, or d for rows
                widths = shape if len(cores) == len(shape) else (math.prod(shape),)
            groups.append(RankGroup(tuple(cores), scales=tuple(scales) if scales else None, widths=widths,
                                    bits=packed_bits.get(g, 4), group_size=scale_groups.get(g)))
            used |= {f"group{g}.core{i}" for i in range(k)} | {f"group{g}.scale{i}" for i in range(len(scales))}
        unexpected = set(tensors) - used - known
        if "row_in_group" in unexpected or any(name.endswith(".token_ids") for name in unexpected):
            raise RungFormatError("this rung stores per-group token ids, the format of tensorslm before the "
                                  "1-byte group map; rebuild the store with `tensorslm compress`")
        if unexpected:
            raise RungFormatError(f"unexpected tensors in rung: {sorted(unexpected)}")
        parts = {name: tensors[name] for name in known if name in tensors}
        return cls(shape, vocab_size, tuple(groups), meta=extra, **parts)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the rung needs; the ratio against fp32 is V*d*4 / nbytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def num_params(self) -> int:
        cores = sum(g.size * r * n * r_next for g in self.groups
                    for r, n, r_next in zip(g.ranks[:-1], g.shape, g.ranks[1:]))
        values = [t for t in (self.col_scale, self.offset, self.basis, self.coeffs, self.sparse_val) if t is not None]
        return cores + sum(t.numel() for t in values)

    @property
    def ratio(self) -> float:
        """Compression ratio against the fp32 dense table."""
        return self.vocab_size * self.dim * 4 / self.nbytes


def _stored_scale(scale: Tensor) -> Tensor:
    """``scale`` as float16 stores it (a zero, for an all-zero group, stored as 1)."""
    scale = scale.half().float()
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_row_groups(rows: Tensor, group_size: int, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Whole rows (V, d) as int4 codes in [-8, 7] with one float16 scale per ``group_size``
    coordinates: codes (V, d) int8, scales (V, d / group_size) float16. Each group's scale is
    the clipping ratio of its absolute maximum (among :data:`~.kernels.INT4_CLIP_RATIOS`) whose codes, times the
    fp16 scale as stored, have the smallest squared error. Rows a chunk at a time."""
    V, d = rows.shape
    _check(group_size > 0 and d % group_size == 0, f"group_size must divide the row width {d}, got {group_size}")
    G = d // group_size
    codes = torch.empty(V, d, dtype=torch.int8)
    scales = torch.empty(V, G, dtype=torch.float16)
    for start in range(0, V, chunk):
        w = rows[start : start + chunk].float().reshape(-1, G, group_size)  # (c, G, g)
        amax = w.abs().amax(dim=-1, keepdim=True)  # (c, G, 1)
        best_scale = best_int4_scales(w, map(_stored_scale, (amax * r / 7 for r in INT4_CLIP_RATIOS)))
        codes[start : start + chunk] = torch.round(w / best_scale).clamp_(-8, 7).reshape(-1, d).to(torch.int8)
        scales[start : start + chunk] = best_scale.reshape(-1, G).half()
    return codes, scales


def reconstruct_rows(rung: Rung, ids: Tensor | Sequence[int]) -> Tensor:
    """The rows ``ids`` (any shape, flattened) rebuilt from the rung: (n, d) float32."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)  # (n,)
    n = ids.numel()
    if n and (int(ids.min()) < 0 or int(ids.max()) >= rung.vocab_size):
        bad = ids[(ids < 0) | (ids >= rung.vocab_size)][0].item()
        raise TokenIndexError(f"token id {bad} is outside the vocabulary 0..{rung.vocab_size - 1}")
    # One new (n, d) buffer per call (two with a permutation): every step after the groups works
    # in place (bench/bench_lookup.py measures the lookup).
    if rung.group_of is None:
        out = rung.groups[0].rows(ids)  # (n, d)
    else:
        group = rung.group_of.index_select(0, ids).long()  # (n,)
        row = rung._row_in_group.index_select(0, ids).long()  # (n,)
        order = torch.argsort(group)  # (n,) requested positions, grouped
        counts = torch.bincount(group, minlength=len(rung.groups)).tolist()  # tokens per group, G ints
        out = torch.empty(n, rung.dim)  # (n, d)
        start = 0
        for g, count in enumerate(counts):  # loop over rank groups, never over tokens
            if count:
                sel = order[start : start + count]  # (n_g,)
                out.index_copy_(0, sel, rung.groups[g].rows(row.index_select(0, sel)))  # (n_g, d) into place
                start += count
    if rung._inverse_perm is not None:
        out = out.index_select(1, rung._inverse_perm)  # back to the original coordinate order
    if rung.col_scale is not None:
        out.mul_(rung.col_scale)
    if rung.offset is not None:
        out.add_(rung.offset)
    if rung.basis is not None:
        out.addmm_(rung.coeffs.index_select(0, ids).float(), rung.basis.float())  # += (n, k) @ (k, d)
    if rung.sparse_idx is not None:
        idx, val = rung.sparse_idx.index_select(0, ids).long(), rung.sparse_val.index_select(0, ids).float()  # (n, s)
        out.scatter_add_(1, idx, val)
    return out
