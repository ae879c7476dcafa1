"""Calibrated int4 for the transformer body: GPTQ (Frantar et al., 2022).

Round-to-nearest int4 minimises the error of every weight on its own; GPTQ minimises the error
of every linear layer's *output* on real inputs. For a linear with weight W (N, K) and inputs
X (T, K) from a calibration text, the output error ||X W^T - X Wq^T||^2 is a quadratic form in
the Hessian H = X^T X. GPTQ quantizes the K columns in order and, after each one, spreads its
rounding error over the columns not yet quantized through the Cholesky factor of H^-1 (so the
later columns absorb what the earlier ones lost), with H dampened by a fraction of its mean
diagonal.

The result is the round-to-nearest int4 format exactly
(:func:`tensorslm.rank_store.kernels.quantize_int4_groups`, or with
``GPTQSettings.asymmetric`` :func:`~tensorslm.rank_store.kernels.quantize_int4_groups_asymmetric`):
codes (N, K) in [-8, 7] and one fp32 scale (and zero) per group of ``group_size`` along K,
chosen when the quantization reaches the group, on the weights as the compensation has left
them. The same kernels run it; only the numbers in the store differ.

:func:`quantize_body_gptq` calibrates a whole body layer by layer: the inputs of decoder layer
i are computed with layers < i already quantized (so each layer corrects what the earlier ones
lost too), by forward hooks on the inputs of the fused linears (``qkv`` and ``gate_up`` share
one input each, their norm's output).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .body import BodyFormatError, decoder_layers, family_of
from .kernels import (DEFAULT_INT4_GROUP, dequantize_int4_groups, quantize_int4_groups,
                      quantize_int4_groups_asymmetric, quantize_int8_rows)

if TYPE_CHECKING:
    from .models import LoadedModel

log = logging.getLogger(__name__)

#: damping added to H's diagonal, as a fraction of its mean diagonal (the paper's 1%)
DEFAULT_DAMP = 0.01
#: columns per lazy batch update (the paper's 128; a multiple of every int4 group size)
DEFAULT_BLOCK = 128


class CalibrationError(BodyFormatError):
    """Calibration token ids of the wrong shape, or a Hessian that does not fit the weight."""


@dataclass(frozen=True)
class GPTQSettings:
    """How :func:`gptq_int4` quantizes: int4 group size, damping, and column order
    (``act_order``: columns of largest H diagonal first, with the group scales fixed from the
    uncompensated weights beforehand so the groups stay contiguous along K).

    ``asymmetric``: a zero point per group besides its scale
    (:func:`tensorslm.rank_store.kernels.quantize_int4_groups_asymmetric`).
    ``int8_linears``: fused linears (``qkv``, ``o``, ``gate_up``, ``down``) kept as int8 rows
    (round to nearest); later layers are calibrated on their int8 outputs.

    ``outlier``: when a whole body is calibrated, a token whose input to a linear has a norm
    above ``outlier`` times the median of its sequence enters that linear's Hessian with its
    norm clipped to that bound. Those are attention-sink tokens with massive activations (in
    SmolLM2 one of them can hold nearly the whole trace of a middle layer's ``down`` Hessian);
    unclipped, they would be the whole objective.

    ``sink_weight``: the same tokens, recognised by the norm of the residual stream entering the
    layer, count ``sink_weight`` times in the Hessians of ``qkv`` and ``gate_up`` (whose inputs
    are normalised, so a sink is one token among hundreds there). Every later token attends to
    a sink's key and value, so their errors cost far more than one token's share (the weights
    tried and their perplexities: docs/engine.md, "Perplexity per body precision")."""
    group_size: int = DEFAULT_INT4_GROUP
    damp: float = DEFAULT_DAMP
    block: int = DEFAULT_BLOCK
    act_order: bool = False
    outlier: float = 10.0
    sink_weight: float = 64.0
    asymmetric: bool = False
    int8_linears: frozenset[str] = frozenset()


def _group_grid(w: Tensor, g: int, asymmetric: bool) -> tuple[Tensor, Tensor]:
    """Scales and zeros (N, K / g) of round-to-nearest int4 groups of ``w`` (zeros 0 if
    symmetric)."""
    if asymmetric:
        _, scales, zeros = quantize_int4_groups_asymmetric(w, g)
        return scales, zeros
    _, scales = quantize_int4_groups(w, g)
    return scales, torch.zeros_like(scales)


def gptq_int4(weight: Tensor, hessian: Tensor, settings: GPTQSettings = GPTQSettings()
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ int4 of ``weight`` (N, K) for inputs whose ``hessian`` (K, K) is X^T X (any positive
    multiple): codes (N, K) int8 in [-8, 7], scales (N, K // group_size) fp32 and, if
    ``settings.asymmetric``, zeros of the scales' shape (else None)."""
    n, k = weight.shape
    g = settings.group_size
    if hessian.shape != (k, k):
        raise CalibrationError(f"the Hessian of a linear with in_features {k} must be ({k}, {k}); "
                               f"got {tuple(hessian.shape)}")
    if k % g or settings.block % g:
        raise CalibrationError(f"group size {g} must divide in_features {k} and the block "
                               f"{settings.block}")
    w = weight.detach().to(torch.float32).clone()  # (N, K)
    h = hessian.detach().to(torch.float32).clone()  # (K, K)
    dead = torch.diag(h) == 0   # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scales = torch.zeros(n, k // g)  # (N, G)
    zeros = torch.zeros(n, k // g)  # (N, G)
    if settings.act_order:   # fixed before the columns move
        scales, zeros = _group_grid(w, g, settings.asymmetric)
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += settings.damp * torch.mean(torch.diag(h)) * torch.eye(k)
    u = _inverse_cholesky_upper(h)  # (K, K) upper: H^-1 = U^T U
    codes = torch.zeros(n, k, dtype=torch.int8)  # permuted column order until the end
    for b0 in range(0, k, settings.block):
        b1 = min(b0 + settings.block, k)
        w1 = w[:, b0:b1].clone()  # (N, B) compensated as the block goes
        err = torch.zeros_like(w1)  # (N, B)
        u1 = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = perm[b0 + j]
            if not settings.act_order and (b0 + j) % g == 0:   # a group starts: its grid now
                s, z = _group_grid(w1[:, j:j + g], g, settings.asymmetric)
                scales[:, (b0 + j) // g], zeros[:, (b0 + j) // g] = s[:, 0], z[:, 0]
            s, z = scales[:, int(col) // g], zeros[:, int(col) // g]  # (N,) each
            q = torch.round((w1[:, j] - z) / s).clamp(-8, 7)  # (N,)
            codes[:, b0 + j] = q.to(torch.int8)
            e = (w1[:, j] - q * s - z) / u1[j, j]  # (N,)
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]   # the block's error reaches the later columns
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out, scales, zeros if settings.asymmetric else None


def _rtn(weight: Tensor, settings: GPTQSettings) -> tuple[Tensor, ...]:
    """Round-to-nearest int4 of ``weight`` in ``settings``' format: (codes, scales[, zeros])."""
    if settings.asymmetric:
        return quantize_int4_groups_asymmetric(weight, settings.group_size)
    return quantize_int4_groups(weight, settings.group_size)


def _inverse_cholesky_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor of H^-1, adding damping until H is numerically positive definite."""
    extra = 0.0
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + extra * torch.eye(h.shape[0]))
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(torch.diag(h).mean()))
    raise CalibrationError("the calibration Hessian is not positive definite even with extra "
                           "damping; calibrate on more tokens")


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T) / tr(W H W^T): the relative squared output error on the inputs
    whose Hessian is ``hessian``."""
    d = (weight - approx).to(torch.float64)
    w = weight.to(torch.float64)
    h = hessian.to(torch.float64)
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


# --------------------------------------------------------------------------- calibration text

def calibration_ids(ids: Tensor, *, sequences: int = 128, length: int = 512,
                    bos_id: int | None = None) -> Tensor:
    """(S, length) calibration batch from 1-D token ids: consecutive non-overlapping sequences of
    ``length`` tokens (the first of them ``bos_id`` when the model wants a BOS), at most
    ``sequences`` of them."""
    body = length - (bos_id is not None)
    count = min(sequences, ids.numel() // body)
    if count < 1:
        raise CalibrationError(f"a calibration text needs at least {body} tokens for one "
                               f"sequence of {length}; got {ids.numel()}")
    rows = ids[:count * body].reshape(count, body)  # (S, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((count, 1), bos_id, dtype=rows.dtype), rows], dim=1)
    return rows.contiguous()


def calibration_from_text(loaded: LoadedModel, text: str, *, skip: int = 0,
                          sequences: int = 128, length: int = 512) -> Tensor:
    """:func:`calibration_ids` from ``text`` tokenized by ``loaded``'s tokenizer, after its
    first ``skip`` tokens (those you evaluate on), with a BOS per sequence if the model wants
    one; sequences no longer than the model's context."""
    from .evaluate import bos_id_of, encode_text

    ids = encode_text(loaded.tokenizer, text)
    return calibration_ids(ids[skip:], sequences=sequences,
                           length=min(length, loaded.context_length), bos_id=bos_id_of(loaded))


def calibration_label(calibration: Tensor) -> str:
    """``gptq:<n> tokens sha256:<12 hex>`` naming what a body was calibrated on."""
    digest = hashlib.sha256(calibration.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return f"gptq:{calibration.numel()} tokens sha256:{digest[:12]}"


def _check_calibration(calibration: Tensor) -> Tensor:
    if calibration.dim() != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise CalibrationError("calibration must be token ids of shape (sequences, length) with "
                               f"length >= 2; got shape {tuple(calibration.shape)}")
    if calibration.dtype not in (torch.int32, torch.int64):
        raise CalibrationError(f"calibration must be integer token ids; got {calibration.dtype}")
    return calibration.to(torch.int64)


# --------------------------------------------------------------------------- whole body

class _Stop(Exception):
    """Ends a forward once decoder layer 0 has its input."""


def _layer_inputs(model: nn.Module, calibration: Tensor
                  ) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """The hidden states entering decoder layer 0 for every calibration sequence ((1, T, d)
    each) and the keyword arguments every layer receives (rotary tables, masks: the same for
    every sequence of one length)."""
    layers = decoder_layers(model)
    hidden: list[Tensor] = []
    kwargs: list[dict[str, Any]] = [{} for _ in layers]
    stop_early = False

    def catch(i: int):
        def hook(_module: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
            if i == 0:
                hidden.append((args[0] if args else kw["hidden_states"]).detach().clone())
            if not kwargs[i]:
                kwargs[i] = {key: value for key, value in kw.items() if key != "hidden_states"}
            if stop_early:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(catch(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for row in calibration:
                try:
                    model.model(input_ids=row[None], use_cache=False)
                except _Stop:
                    pass
                stop_early = True   # the first sequence ran every layer: kwargs are complete
    finally:
        for handle in handles:
            handle.remove()
    return hidden, kwargs


def _fused_inputs(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear whose input is each fused linear's input."""
    att, mlp = layer.self_attn, layer.mlp
    return {"qkv": att.q_proj, "o": att.o_proj, "gate_up": mlp.gate_proj, "down": mlp.down_proj}


def _fused_parts(layer: nn.Module) -> dict[str, tuple[nn.Linear, ...]]:
    att, mlp = layer.self_attn, layer.mlp
    return {"qkv": (att.q_proj, att.k_proj, att.v_proj), "o": (att.o_proj,),
            "gate_up": (mlp.gate_proj, mlp.up_proj), "down": (mlp.down_proj,)}


@contextmanager
def _hessians(layer: nn.Module, outlier: float, sink_weight: float) -> Iterator[dict[str, Tensor]]:
    """Accumulate X^T X of each fused linear's inputs while ``layer`` runs inside the block:
    input norms clipped to ``outlier`` times the sequence's median, sink tokens weighted by
    ``sink_weight`` in ``qkv`` and ``gate_up`` (see :class:`GPTQSettings`)."""
    sums: dict[str, Tensor] = {}
    sinks: list[Tensor] = []

    def find_sinks(_module: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
        h = (args[0] if args else kw["hidden_states"]).detach()
        norms = h.reshape(-1, h.shape[-1]).norm(dim=1, keepdim=True)  # (T, 1)
        sinks[:] = [norms > outlier * norms.median()]

    def capture(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)  # (T, K)
            norms = x.norm(dim=1, keepdim=True)  # (T, 1)
            x = x * (outlier * norms.median() / norms).clamp(max=1.0)
            if name in ("qkv", "gate_up"):
                x = torch.where(sinks[0], x * sink_weight ** 0.5, x)
            if name in sums:
                sums[name].addmm_(x.t(), x)
            else:
                sums[name] = x.t() @ x
        return hook

    handles = [lin.register_forward_pre_hook(capture(name))
               for name, lin in _fused_inputs(layer).items()]
    handles.append(layer.register_forward_pre_hook(find_sinks, with_kwargs=True))
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def _run_layer(layer: nn.Module, hidden: list[Tensor], kwargs: dict[str, Any]) -> list[Tensor]:
    with torch.inference_mode():
        out = []
        for h in hidden:
            y = layer(h, **kwargs)
            out.append(y[0] if isinstance(y, tuple) else y)
        return out


def _swap(parts: tuple[nn.Linear, ...], approx: Tensor,
          originals: list[tuple[nn.Linear, Tensor]]) -> None:
    """Give ``parts`` their rows of the quantized fused weight ``approx`` (later layers see this
    layer quantized), remembering the originals."""
    start = 0
    for lin in parts:
        rows = lin.weight.shape[0]
        originals.append((lin, lin.weight.data))
        lin.weight.data = approx[start:start + rows].to(lin.weight.dtype)
        start += rows


def quantize_body_gptq(model: nn.Module, calibration: Tensor,
                       settings: GPTQSettings = GPTQSettings(), *, progress: bool = False
                       ) -> dict[str, Tensor]:
    """The int4 body of ``model`` calibrated by GPTQ on ``calibration`` token ids
    (sequences, length): ``layers.<i>.<linear>.codes`` / ``.scales`` as
    :func:`tensorslm.rank_store.body.quantize_body` returns them for ``int4``.

    Layer by layer: the Hessians of layer i come from inputs computed with layers < i already
    quantized. ``model``'s weights are swapped for their quantized values while this runs and
    restored before it returns."""
    from tqdm.auto import tqdm

    family_of(model)
    if any(p.is_meta for p in decoder_layers(model).parameters()):
        raise CalibrationError("GPTQ runs the model's forward on the calibration text; its body "
                               "weights were left in the checkpoint (a skeleton load): load the "
                               "whole model to calibrate")
    calibration = _check_calibration(calibration)
    hidden, kwargs = _layer_inputs(model, calibration)
    out: dict[str, Tensor] = {}
    originals: list[tuple[nn.Linear, Tensor]] = []
    layers = decoder_layers(model)
    try:
        for i, layer in enumerate(tqdm(layers, desc="gptq", unit="layer", disable=not progress)):
            with _hessians(layer, settings.outlier, settings.sink_weight) as sums:
                _run_layer(layer, hidden, kwargs[i])
            for name, parts in _fused_parts(layer).items():
                for lin in parts:
                    if lin.bias is not None:
                        raise BodyFormatError(f"layer {i}: linear layers with a bias are not "
                                              "supported")
                weight = torch.cat([lin.weight.detach().float() for lin in parts])  # (N, K)
                if name in settings.int8_linears:
                    codes, scales = quantize_int8_rows(weight)
                    out[f"layers.{i}.{name}.codes"] = codes
                    out[f"layers.{i}.{name}.scales"] = scales
                    _swap(parts, codes.float() * scales[:, None], originals)
                    continue
                codes, scales, zeros = gptq_int4(weight, sums[name], settings)
                out[f"layers.{i}.{name}.codes"], out[f"layers.{i}.{name}.scales"] = codes, scales
                if zeros is not None:
                    out[f"layers.{i}.{name}.zeros"] = zeros
                approx = dequantize_int4_groups(codes, scales, zeros)
                log.debug("layer %d %s: output error %.2e (round-to-nearest %.2e)", i, name,
                          output_error(weight, approx, sums[name]),
                          output_error(weight, dequantize_int4_groups(
                              *_rtn(weight, settings)), sums[name]))
                _swap(parts, approx, originals)
            hidden = _run_layer(layer, hidden, kwargs[i])
    finally:
        for lin, weight in originals:
            lin.weight.data = weight
    return out
