"""The engine's one-token decode step as a single TorchScript function.

A decode step at batch 1 is about 120 kernel calls and several hundred small tensor ops (norms,
rotary, attention over the cache, residual adds); run from Python, every op also pays the
interpreter's bytecode and argument parsing. :func:`decode_layers` is the same step, op for op,
as :meth:`tensorslm.rank_store.engine.Engine._decode`, compiled once per process by TorchScript,
whose interpreter runs the ops without Python in between: the logits are bit-identical and the
step costs less CPU (``bench/bench_decode_step.py``; figures in docs/engine.md).

Why TorchScript rather than ``torch.compile``: TorchScript ships in every torch wheel, the Pi's
included, scripts this step in about a second and needs no C++ compiler on the device; inductor
needs one and minutes of compilation (docs/engine.md, "Candidates for the per-token overhead").
torch marks ``torch.jit.script`` deprecated: :func:`scripted` returns None if scripting fails,
and the engine then runs the step from Python.

Only kernels with a TorchScript call run here
(:data:`~tensorslm.rank_store.kernels.SCRIPTED_KERNELS`); a body with another kernel (the
dequantising fallbacks) decodes from Python.
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import List  # noqa: UP035 - TorchScript reads List[...] annotations, not list[...]

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import mm_w8a8, scripted_linear

log = logging.getLogger(__name__)


def _linear(x: Tensor, j: int, kinds: List[int], weights: List[Tensor], dims: List[int],
            params: List[torch.classes.quantized.LinearPackedParamsBase]) -> Tensor:
    p = dims[4 * j + 3]
    if p >= 0:
        return mm_w8a8(x, weights[2 * j], params[p])
    return scripted_linear(x, kinds[j], weights[2 * j], weights[2 * j + 1], dims[4 * j],
                           dims[4 * j + 1], dims[4 * j + 2])


def decode_layers(x: Tensor, pos: int, norms: List[Tensor], qk_norms: List[Tensor],
                  kinds: List[int], weights: List[Tensor], dims: List[int],
                  params: List[torch.classes.quantized.LinearPackedParamsBase],
                  caches: List[Tensor], cos: List[Tensor], sin: List[Tensor], windows: List[int],
                  final_norm: Tensor,
                  num_heads: int, num_kv_heads: int, head_dim: int, eps: float, gemma: bool
                  ) -> Tensor:
    """One token's hidden state (1, d) at ``pos`` -> final-normed (1, d), writing layer i's keys
    and values into ``caches[2i]``, ``caches[2i + 1]`` (Hkv, L, hd) at ``pos``.

    Per layer i: linears j = 4i..4i+3 (qkv, o, gate_up, down) as ``kinds[j]``, ``weights[2j]``,
    ``weights[2j + 1]`` and ``dims[4j:4j + 4]`` (group size, out and in features, and the
    index in ``params`` of a w8a8 linear's packed object, or -1); norms ``norms[4i:4i + 4]``
    (input, post-attention, and Gemma's pre- and post-feed-forward; empty tensors for Llama);
    ``qk_norms[i]`` (Hq+Hkv, hd) for Gemma; rotary tables ``cos[i]``, ``sin[i]``
    (L, Hq+Hkv, hd) with the attention scale folded into the q rows; ``windows[i]`` the sliding
    window or -1."""
    d = x.shape[-1]
    nq, nkv, hd = num_heads, num_kv_heads, head_dim
    group = nq // nkv
    q_size = nq * hd
    qk_size = q_size + nkv * hd
    for i in range(len(windows)):
        n = 4 * i
        qkv = _linear(F.rms_norm(x, [d], norms[n], eps), 4 * i, kinds, weights, dims, params)[0]
        qk = qkv[:qk_size].view(nq + nkv, hd)
        if gemma:
            qk = F.rms_norm(qk, [hd], None, eps) * qk_norms[i]
        qk = torch.addcmul(qk * cos[i][pos], qk.roll(hd // 2, -1), sin[i][pos])
        kc = caches[2 * i]
        vc = caches[2 * i + 1]
        kc[:, pos] = qk[nq:]
        vc[:, pos] = qkv[qk_size:].view(nkv, hd)
        lo = 0 if windows[i] < 0 else max(0, pos + 1 - windows[i])
        scores = torch.bmm(qk[:nq].view(nkv, group, hd),
                           kc[:, lo:pos + 1].transpose(1, 2))  # (Hkv, G, S)
        a = torch.bmm(torch.softmax(scores, dim=-1), vc[:, lo:pos + 1])  # (Hkv, G, hd)
        a = _linear(a.view(1, q_size), 4 * i + 1, kinds, weights, dims, params)  # (1, d)
        if gemma:   # sandwich norms
            x = x + F.rms_norm(a, [d], norms[n + 1], eps)
            h = F.rms_norm(x, [d], norms[n + 2], eps)
        else:
            x = x + a
            h = F.rms_norm(x, [d], norms[n + 1], eps)
        gate_up = _linear(h, 4 * i + 2, kinds, weights, dims, params)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if gemma else F.silu(gate)
        m = _linear(act * up, 4 * i + 3, kinds, weights, dims, params)
        x = x + (F.rms_norm(m, [d], norms[n + 3], eps) if gemma else m)
    return F.rms_norm(x, [d], final_norm, eps)


@functools.cache
def scripted() -> torch.jit.ScriptFunction | None:
    """:func:`decode_layers` compiled by TorchScript (once per process), or None when this torch
    cannot script it (the reason is logged)."""
    try:
        with warnings.catch_warnings():   # deprecated, not removed; see the module docstring
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(decode_layers)
    except Exception as exc:  # noqa: BLE001 - any failure means: decode from Python
        log.warning("TorchScript could not compile the decode step (%s: %s); decoding from "
                    "Python", type(exc).__name__, exc)
        return None
