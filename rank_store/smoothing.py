"""SmoothQuant input scales for the ``w8a8`` body: int8 activations without outlier channels.

A ``w8a8`` linear quantises each token's input to 8 bits with one step for the whole row, so a
few channels with large activations (transformers have them in every layer) would set the step
and flatten the rest. SmoothQuant (Xiao et al., 2023) migrates part of that range into the
weight: with ``s_j = max|x_j|^a / max|W_j|^(1-a)`` per input channel ``j``, ``x W^T = (x / s)
(W * s)^T`` exactly, and ``x / s`` has flatter channels. The body keeps ``W * s`` as int8 rows and
``s`` per linear; the kernel layer multiplies the input by ``1 / s`` before quantising it
(:class:`tensorslm.rank_store.kernels.PackedLinear` ``input_scale``).

The channel maxima come from running the whole model on calibration text
(:func:`channel_maxima`); without calibration a ``w8a8`` body has no scales (``s = 1``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import RankStoreError
from .body import decoder_layers

#: SmoothQuant's migration strength: with it the w8a8 body costs +0.17% (SmolLM2) and +0.13%
#: (Gemma) perplexity where no migration costs +0.65% / +0.78% (first 2,048 WikiText-2 test
#: tokens, bench/results/activation_quant.md)
DEFAULT_ALPHA = 0.5
#: calibration sequences of 512 tokens for the channel maxima (``tensorslm compress
#: --body-calibration``)
CALIBRATION_SEQUENCES = 16

#: the fused body linear each projection's input feeds (q, k and v share one input, as do gate
#: and up)
_INPUTS = {"self_attn.q_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up",
           "mlp.down_proj": "down"}


class SmoothingError(RankStoreError, ValueError):
    """Calibration for input scales that cannot run (a skeleton model, bad token ids)."""


@torch.inference_mode()
def channel_maxima(model: nn.Module, calibration: Tensor) -> dict[str, Tensor]:
    """``layers.<i>.<linear>`` -> (K,) the largest |input| per channel over ``calibration``
    token ids (sequences, length), one forward per sequence."""
    layers = decoder_layers(model)
    if any(p.is_meta for p in layers.parameters()):
        raise SmoothingError("input scales come from the model's forward on calibration text; "
                             "its body weights were left in the checkpoint (a skeleton load): "
                             "load the whole model to calibrate")
    if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
        raise SmoothingError("calibration must be integer token ids of shape (sequences, length); "
                             f"got {calibration.dtype} {tuple(calibration.shape)}")
    maxima: dict[str, Tensor] = {}

    def record(name: str, x: Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)

    hooks = []
    for i, layer in enumerate(layers):
        for path, linear in _INPUTS.items():
            module = layer.get_submodule(path)
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, name=f"layers.{i}.{linear}": record(name, args[0])))
    try:
        for row in calibration.to(torch.int64):
            model(input_ids=row[None])
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def input_scales(maxima: Tensor, weight: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """(K,) ``s`` for a (N, K) ``weight`` whose input channels reach ``maxima``; channels that
    never moved keep s = 1."""
    if not 0 <= alpha <= 1:
        raise SmoothingError(f"alpha must lie in [0, 1], got {alpha}")
    w = weight.detach().abs().amax(0).float()
    s = maxima.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((maxima > 0) & (w > 0), s, torch.ones_like(s))

