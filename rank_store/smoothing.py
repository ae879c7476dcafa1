"""SmoothQuant input scales for the ``w8a8`` body: int8 activations without outlier channels.

A ``w8a8`` linear quantises each token's input to 8 bits with one step for the whole row, so a
few channels with large activations (transformers have them in every layer) would set the step
and flatten the rest. SmoothQuant (Xiao et al., 2023) migrates part of that range into the
weight: with ``s_j = max|x_j|^a / max|W_j|^(1-a)`` per input channel ``j``, ``x W^T = (x / s)
(W * s)^T`` exactly, and ``x / s`` has flatter channels. The body keeps ``W * s`` as int8 rows and
``s`` per linear; the kernel layer multiplies the input by ``1 / s`` before quantising it
(:class:`tensorslm.rank_store.kernels.PackedLinear` ``input_scale``).

The channel maxima come from running the whole model on calibration text
(:func:`channel_maxima`): text the owner gives, else text the model writes itself
(:func:`self_calibration`, what ``tensorslm compress`` does by default). A ``w8a8`` body
quantised without either (the agent quantising at start-up, or serving a store's ``int8`` body
as ``w8a8``) has no scales (``s = 1``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import RankStoreError
from .body import decoder_layers
from .models import LoadedModel

#: SmoothQuant's migration strength: with it the w8a8 body costs +0.17% (SmolLM2) and +0.13%
#: (Gemma) perplexity where no migration costs +0.65% / +0.78% (first 2,048 WikiText-2 test
#: tokens, bench/results/activation_quant.md)
DEFAULT_ALPHA = 0.5
#: calibration sequences of 512 tokens for the channel maxima (``tensorslm compress
#: --body-calibration``)
CALIBRATION_SEQUENCES = 16
#: the text the model writes for its own calibration (:func:`self_calibration`): sequences of
#: tokens; 2,048 tokens take about a minute on SmolLM2 here (docs/engine.md has the perplexities)
SELF_CALIBRATION_SEQUENCES, SELF_CALIBRATION_LENGTH = 8, 256
#: a short sample (sequences, length) for a first run that should not wait minutes (the demo):
#: 256 tokens cost +0.05% perplexity against fp32 on SmolLM2 and on Gemma, 2,048 tokens -0.16% /
#: +0.33%, no calibration +1.09% / +0.88% (first 8,192 WikiText-2 test tokens; docs/engine.md)
SHORT_SELF_CALIBRATION = (2, 128)

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


def start_token(loaded: LoadedModel) -> int:
    """The token :func:`self_calibration` starts each sequence from: the tokenizer's BOS, else
    its end-of-sequence token."""
    tokenizer = loaded.tokenizer
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise SmoothingError(f"{loaded.name}: the tokenizer has neither a BOS nor an EOS token to "
                         "start self-calibration from; give a calibration text "
                         "(--body-calibration)")


def self_calibration_of(loaded: LoadedModel, *, sequences: int = SELF_CALIBRATION_SEQUENCES,
                        length: int = SELF_CALIBRATION_LENGTH, progress: bool = False) -> Tensor:
    """:func:`self_calibration` of a loaded model: from :func:`start_token`, sequences no
    longer than its context (the defaults are what ``tensorslm compress`` stores a ``w8a8``
    body with; the demo takes :data:`SHORT_SELF_CALIBRATION`)."""
    return self_calibration(loaded.model, start_token(loaded), progress=progress,
                            sequences=sequences, length=min(length, loaded.context_length))


def self_calibration(model: nn.Module, start_id: int, *,
                     sequences: int = SELF_CALIBRATION_SEQUENCES,
                     length: int = SELF_CALIBRATION_LENGTH, seed: int = 0,
                     progress: bool = False) -> Tensor:
    """Calibration token ids the model writes itself, for a ``w8a8`` body when no calibration
    text is given: ``sequences`` samples of ``length`` tokens from ``start_id`` (a BOS, or the
    end-of-text token a document follows), drawn at temperature 1 by the engine at the ``int8``
    body (weights only: the distribution of the float model to +0.3% perplexity). The outlier
    channels the scales tame belong to the weights, not to a corpus, so the model's own text
    shows them (docs/engine.md has the perplexities)."""
    from tqdm.auto import tqdm

    from .engine import Engine, sampler

    layers = decoder_layers(model)
    if any(p.is_meta for p in layers.parameters()):
        raise SmoothingError("self-calibration runs the model; its body weights were left in "
                             "the checkpoint (a skeleton load): load the whole model")
    engine = Engine.from_model(model, "int8")
    pick = sampler(1.0, generator=torch.Generator().manual_seed(seed))
    rows = []
    with tqdm(total=sequences * length, desc="w8a8 self-calibration", unit="token",
              disable=not progress) as bar:
        for _ in range(sequences):
            row = [start_id, *engine.generate([start_id], length - 1, sample=pick,
                                              on_token=lambda _t: bar.update())]
            bar.update()
            rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def input_scales(maxima: Tensor, weight: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """(K,) ``s`` for a (N, K) ``weight`` whose input channels reach ``maxima``; channels that
    never moved keep s = 1."""
    if not 0 <= alpha <= 1:
        raise SmoothingError(f"alpha must lie in [0, 1], got {alpha}")
    w = weight.detach().abs().amax(0).float()
    s = maxima.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((maxima > 0) & (w > 0), s, torch.ones_like(s))

