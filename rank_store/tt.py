"""Per-token tensor-train (TT) decomposition of an embedding table, vectorised over the vocabulary.

Every row x (dimension d) of a table W (V, d) is reshaped to an order-N tensor of shape
(n_1, ..., n_N), prod n_k = d, and decomposed on its own by TT-SVD into cores
G_k of shape (r_{k-1}, n_k, r_k) with r_0 = r_N = 1. For the whole vocabulary the cores
are stacked: ``cores[k]`` has shape (V, r_{k-1}, n_k, r_k). All tokens go through
batched ``torch.linalg.svd`` calls, in chunks of rows so that memory stays bounded;
there is no Python loop over tokens.

Three ways to choose ranks share this module:

* :func:`tt_svd` -- one rank list for every token (``None`` = exact);
* :func:`tt_svd_ladder` -- several rank lists at once; decompositions of identical rank prefixes
  (the first unfolding always) are computed once per chunk and truncated per rung;
* :func:`tt_svd_tolerance` -- ranks chosen per token so that every token meets a relative
  error tolerance, tokens returned in groups of equal rank signature.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from .errors import TensorShapeError
from .tensorize import check_shape

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4096


@dataclass(frozen=True)
class TTCores:
    """Stacked per-token TT cores: ``cores[k]`` has shape (V, r_{k-1}, n_k, r_k), r_0 = r_N = 1."""

    cores: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        cores = tuple(self.cores)
        object.__setattr__(self, "cores", cores)
        if not cores:
            raise TensorShapeError("a TT needs at least one core, got none")
        vocab = cores[0].shape[0] if cores[0].dim() == 4 else None
        previous = 1
        for k, core in enumerate(cores):
            if core.dim() != 4:
                raise TensorShapeError(
                    f"core {k} must have 4 dimensions (V, r_{k}, n_{k + 1}, r_{k + 1}), got shape {tuple(core.shape)}"
                )
            if core.shape[0] != vocab:
                raise TensorShapeError(f"core {k} holds {core.shape[0]} tokens, core 0 holds {vocab}")
            if core.shape[1] != previous:
                raise TensorShapeError(
                    f"core {k} has left rank {core.shape[1]}, expected {previous} "
                    f"(the right rank of core {k - 1}, or 1 for the first core)"
                )
            previous = core.shape[3]
        if previous != 1:
            raise TensorShapeError(f"the last core must have right rank 1, got {previous}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor shape (n_1, ..., n_N)."""
        return tuple(core.shape[2] for core in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """All TT ranks (r_0, ..., r_N), with r_0 = r_N = 1."""
        return (1,) + tuple(core.shape[3] for core in self.cores)

    @property
    def vocab_size(self) -> int:
        return self.cores[0].shape[0]

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def num_params(self) -> int:
        return sum(core.numel() for core in self.cores)


def max_ranks(shape: Sequence[int]) -> tuple[int, ...]:
    """The inner ranks (r_1..r_{N-1}) of an exact TT: r_k = min(n_1...n_k, n_{k+1}...n_N)."""
    return tuple(min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(len(shape) - 1))


def clamp_ranks(shape: Sequence[int], ranks: Sequence[int] | None) -> tuple[int, ...]:
    """Inner ranks clamped to what TT-SVD can produce for ``shape``; ``None`` means exact.

    Besides r_k <= min(n_1...n_k, n_{k+1}...n_N), neighbouring ranks bound each other:
    r_k <= r_{k-1} n_k and r_{k-1} <= n_k r_k.
    """
    shape = tuple(shape)
    bound = max_ranks(shape)
    if ranks is None:
        return bound
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) != len(shape) - 1:
        raise TensorShapeError(
            f"a TT of shape {'x'.join(map(str, shape))} needs {len(shape) - 1} inner ranks, "
            f"got {len(ranks)} ({'x'.join(map(str, ranks)) or 'none'}); write them like "
            f"{'x'.join(map(str, bound)) or 'max'} or use 'max'"
        )
    if any(r < 1 for r in ranks):
        raise TensorShapeError(f"TT ranks must be >= 1, got {'x'.join(map(str, ranks))}")
    full = [1] + [min(r, b) for r, b in zip(ranks, bound)] + [1]
    for k in range(1, len(full) - 1):
        full[k] = min(full[k], full[k - 1] * shape[k - 1])
    for k in range(len(full) - 2, 0, -1):
        full[k] = min(full[k], shape[k] * full[k + 1])
    clamped = tuple(full[1:-1])
    if clamped != ranks:
        log.info("ranks %s clamped to %s for shape %s", ranks, clamped, shape)
    return clamped


def num_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Entries of one token's cores for the given inner ranks."""
    full = (1, *ranks, 1)
    return sum(full[k] * n * full[k + 1] for k, n in enumerate(shape))


def contract(cores: Sequence[Tensor]) -> Tensor:
    """Rows from gathered float cores, each (n, r_{k-1}, n_k, r_k): returns (n, d)."""
    n = cores[0].shape[0]
    out = cores[0].reshape(n, -1, cores[0].shape[3])  # (n, n_1, r_1)
    for core in cores[1:]:
        r_prev, width, r_next = core.shape[1:]
        out = torch.bmm(out, core.reshape(n, r_prev, width * r_next))  # (n, P, n_k r_k)
        out = out.reshape(n, -1, r_next)  # (n, P n_k, r_k)
    return out.reshape(n, -1)  # (n, d)


def _check_matrix(matrix: Tensor, shape: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    matrix = torch.as_tensor(matrix)
    if matrix.dim() != 2:
        raise TensorShapeError(f"expected a table of shape (V, d), got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TensorShapeError(f"expected a floating-point table, got dtype {matrix.dtype}")
    return matrix, check_shape(shape, matrix.shape[1])


def _chunks(vocab: int, chunk_size: int, progress: bool, desc: str) -> Iterator[slice]:
    if chunk_size < 1:
        raise TensorShapeError(f"chunk_size must be >= 1, got {chunk_size}")
    starts = range(0, vocab, chunk_size)
    for start in tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2):
        yield slice(start, min(start + chunk_size, vocab))


class _Split:
    """The best rank-r splits M ~ A_r B_r of a batch of unfoldings M (c, a, b), for any r.

    Computed from the eigendecomposition of the smaller Gram matrix in float64 (cheaper than a
    batched SVD of these thin matrices): with left singular vectors U, A_r = U_r and
    B_r = U_r^T M; with right singular vectors V, A_r = M V_r and B_r = V_r^T. Either way
    A_r B_r is the truncated SVD of M.
    """

    def __init__(self, unfolding: Tensor, last: bool) -> None:
        m = unfolding.double()  # (c, a, b)
        self.m = m
        # B_r carries the singular values only in the left form; the TT-SVD sweep needs them in
        # what it decomposes next, so the right form is used for the last unfolding only.
        self.left = m.shape[1] <= m.shape[2] or not last
        gram = m @ m.transpose(1, 2) if self.left else m.transpose(1, 2) @ m  # (c, a, a) or (c, b, b)
        _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
        self.vectors = vectors.flip(2)  # (c, a|b, a|b), leading singular vectors first
        self._splits: dict[int, tuple[Tensor, Tensor]] = {}

    def split(self, r: int) -> tuple[Tensor, Tensor]:
        """(A_r (c, a, r), B_r (c, r, b)), float64; computed once per r."""
        if r not in self._splits:
            top = self.vectors[:, :, :r]  # (c, a, r) left, (c, b, r) right
            if self.left:
                self._splits[r] = (top, top.transpose(1, 2) @ self.m)  # (c, a, r), (c, r, b)
            else:
                self._splits[r] = (self.m @ top, top.transpose(1, 2))  # (c, a, r), (c, r, b)
        return self._splits[r]


def _chunk_ladder(x: Tensor, shape: tuple[int, ...], rank_lists: list[tuple[int, ...]]) -> list[list[Tensor]]:
    """TT-SVD of the rows x (c, d) for every rank list, sharing decompositions of equal rank prefixes."""
    c = x.shape[0]
    if len(shape) == 1:
        return [[x.reshape(c, 1, shape[0], 1)] for _ in rank_lists]  # one core (c, 1, d, 1)
    splits: dict[tuple[int, ...], _Split] = {}

    def split_after(prefix: tuple[int, ...]) -> _Split:
        if prefix not in splits:
            k = len(prefix)
            if k == 0:
                unfolding = x.reshape(c, shape[0], -1)  # (c, n_1, n_2...n_N)
            else:
                _, rest = split_after(prefix[:-1]).split(prefix[-1])  # (c, r_k, n_{k+1}...n_N)
                unfolding = rest.reshape(c, prefix[-1] * shape[k], -1)  # (c, r_k n_{k+1}, n_{k+2}...)
            splits[prefix] = _Split(unfolding, last=k == len(shape) - 2)
        return splits[prefix]

    results = []
    for ranks in rank_lists:
        cores, previous = [], 1
        for k, r in enumerate(ranks):
            core, _ = split_after(ranks[:k]).split(r)  # (c, r_{k-1} n_k, r_k)
            cores.append(core.float().reshape(c, previous, shape[k], r))  # (c, r_{k-1}, n_k, r_k)
            previous = r
        _, last = split_after(ranks[:-1]).split(previous)  # (c, r_{N-1}, n_N)
        cores.append(last.float().reshape(c, previous, shape[-1], 1))  # (c, r_{N-1}, n_N, 1)
        results.append(cores)
    return results


def tt_svd_ladder(
    matrix: Tensor,
    shape: Sequence[int],
    rank_lists: Sequence[Sequence[int] | None],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> list[TTCores]:
    """Per-token TT-SVD of ``matrix`` (V, d) at several rank lists in one pass.

    Each rank list is clamped by :func:`clamp_ranks` (``None`` = exact). Per chunk of rows the
    decomposition of the first unfolding is computed once and truncated at each rung's r_1;
    later ones are shared by rungs whose leading ranks agree. Truncated SVDs come from float64
    eigendecompositions of the small Gram matrices (see ``_Split``).
    """
    matrix, shape = _check_matrix(matrix, shape)
    lists = [clamp_ranks(shape, r) for r in rank_lists]
    vocab = matrix.shape[0]
    parts: list[list[list[Tensor]]] = [[] for _ in lists]
    for rows in _chunks(vocab, chunk_size, progress, "TT-SVD"):
        x = matrix[rows].float()  # (c, d)
        for part, cores in zip(parts, _chunk_ladder(x, shape, lists)):
            part.append(cores)
    return [TTCores(tuple(torch.cat(ks, 0) for ks in zip(*part))) for part in parts]


def tt_svd(
    matrix: Tensor,
    shape: Sequence[int],
    ranks: Sequence[int] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> TTCores:
    """Per-token TT-SVD of ``matrix`` (V, d) at one rank list (``None`` = exact, clamped)."""
    return tt_svd_ladder(matrix, shape, [ranks], chunk_size=chunk_size, progress=progress)[0]


def _ranks_for_budget(s: Tensor, allowed: Tensor) -> Tensor:
    """Per row, the smallest rank r >= 1 whose discarded energy sum_{j>=r} s_j^2 <= allowed."""
    energy = s.double() ** 2  # (c, m)
    tail = energy.flip(1).cumsum(1).flip(1)  # (c, m): tail[:, j] = sum_{i >= j} s_i^2
    return 1 + (tail[:, 1:] > allowed[:, None]).sum(1)  # (c,)


def tt_svd_tolerance(
    matrix: Tensor,
    shape: Sequence[int],
    tolerance: float,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> dict[tuple[int, ...], tuple[Tensor, TTCores]]:
    """Per-token TT-SVD with ranks chosen per token so that ||x - x_hat|| <= tolerance * ||x||.

    The squared error of TT-SVD is the sum of the energies discarded at each unfolding, so the
    budget tolerance^2 ||x||^2 is spent step by step: step k may discard what is left of it
    divided by the steps that remain. Tokens are decomposed together: a token's truncation is
    a mask on the singular values, which keeps the batch rectangular. The result maps each
    rank signature (r_1..r_{N-1}) to (token ids (V_g,), TTCores of those tokens), ids ascending.
    """
    matrix, shape = _check_matrix(matrix, shape)
    if not 0 <= tolerance < 1:
        raise TensorShapeError(f"tolerance must be in [0, 1), got {tolerance}")
    order = len(shape)
    collected: dict[tuple[int, ...], list[tuple[Tensor, list[Tensor]]]] = {}
    for rows in _chunks(matrix.shape[0], chunk_size, progress, f"TT-SVD eps={tolerance:g}"):
        x = matrix[rows].float()  # (c, d)
        c = x.shape[0]
        ids = torch.arange(rows.start, rows.stop)
        if order == 1:
            collected.setdefault((), []).append((ids, [x.reshape(c, 1, shape[0], 1)]))
            continue
        # Slightly under the budget so that float32 rounding cannot push a token over it.
        budget = (tolerance**2) * (1 - 1e-4) * (x.double() ** 2).sum(1)  # (c,)
        cores, ranks = [], []
        unfolding = x.reshape(c, shape[0], -1)  # (c, n_1, rest)
        previous = 1
        for k in range(order - 1):
            u, s, vh = torch.linalg.svd(unfolding, full_matrices=False)  # (c, a, m_k), (c, m_k), (c, m_k, b)
            r = _ranks_for_budget(s, budget / (order - 1 - k))  # (c,)
            energy = (s.double() ** 2)
            keep = torch.arange(s.shape[1])[None, :] < r[:, None]  # (c, m)
            budget = budget - (energy * ~keep).sum(1)
            cores.append(u.reshape(c, previous, shape[k], u.shape[2]))  # (c, m_{k-1}, n_k, m_k)
            ranks.append(r)
            rest = (s * keep)[:, :, None] * vh  # (c, m_k, rest); rows beyond r_k are zero
            previous = s.shape[1]
            unfolding = rest.reshape(c, previous * shape[k + 1], -1)  # (c, m_k n_{k+1}, rest)
        cores.append(unfolding.reshape(c, previous, shape[-1], 1))  # (c, m_{N-1}, n_N, 1)
        signature = torch.stack(ranks, 1)  # (c, N-1)
        unique, inverse = torch.unique(signature, dim=0, return_inverse=True)  # (S, N-1), (c,)
        for j, sig in enumerate(unique.tolist()):
            sel = (inverse == j).nonzero().squeeze(1)  # (c_g,)
            full = (1, *sig, 1)
            group = [
                core.index_select(0, sel)[:, : full[k], :, : full[k + 1]].contiguous()  # (c_g, r_{k-1}, n_k, r_k)
                for k, core in enumerate(cores)
            ]
            collected.setdefault(tuple(sig), []).append((ids[sel], group))
    groups = {}
    for sig in sorted(collected, reverse=True):
        pieces = collected[sig]
        ids = torch.cat([p[0] for p in pieces])
        cores = TTCores(tuple(torch.cat(ks, 0) for ks in zip(*[p[1] for p in pieces])))
        groups[sig] = (ids, cores)
    return groups
