"""The decode engine: a transformer forward written for one sequence, over packed body weights.

Why not the Hugging Face forward: at batch 1 its per-token cost on a CPU is mostly Python and
dispatch (masks, cache objects, hooks, three separate q/k/v calls); see docs/engine.md for the
measured candidates. :class:`Engine` keeps the model's norms, rotary tables and layer order
but runs each layer as a handful of tensor ops over

* the body's linears packed once for the kernel layer (:mod:`tensorslm.rank_store.kernels`) at
  the chosen :class:`~tensorslm.rank_store.kernels.Precision`, q/k/v and gate/up fused;
* a static KV cache (grown in steps of 256 positions when a query needs more, kept across
  queries, dropped by :meth:`Engine.release`), written in place;
* a batched prefill (the whole prompt in one pass, causal attention, sliding windows masked).

The input embedding and the LM head are *not* the engine's: every query looks up
``model.get_input_embeddings()`` and ``model.get_output_embeddings()`` afresh, so installing
another embedding, switching its active rung or replacing the head between queries takes
effect at the next query. Supported families: Llama (SmolLM2) and Gemma 3.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode_step
from .body import LINEARS, BodyFormatError, body_for, decoder_layers, family_of
from .kernels import PackedLinear, Precision

if TYPE_CHECKING:
    from .shell import EngineModel   # what the engine reads of a model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineShape:
    """What the forward needs from a model config."""

    family: str                 # "llama" or "gemma3"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    eps: float
    scaling: float              # attention logit scale
    sliding: tuple[int | None, ...]   # per layer: window size, or None for global attention
    layer_rope: tuple[str, ...]       # per layer: key of its rotary table
    final_softcap: float | None

    @classmethod
    def of(cls, model: EngineModel) -> EngineShape:
        family = family_of(model)
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n = c.num_hidden_layers
        if family == "gemma3":
            types = tuple(c.layer_types)
            sliding = tuple(c.sliding_window if t == "sliding_attention" else None for t in types)
            if getattr(c, "attn_logit_softcapping", None) is not None:
                raise BodyFormatError("attention logit soft-capping is not supported by the engine")
            return cls(family, n, c.num_attention_heads, c.num_key_value_heads, head_dim,
                       c.hidden_size, c.rms_norm_eps, c.query_pre_attn_scalar ** -0.5, sliding,
                       types, getattr(c, "final_logit_softcapping", None))
        return cls(family, n, c.num_attention_heads, c.num_key_value_heads, head_dim,
                   c.hidden_size, c.rms_norm_eps, head_dim ** -0.5, (None,) * n,
                   ("default",) * n, None)


@dataclass(frozen=True)
class EngineOutput:
    logits: Tensor  # (1, T, V)


class _Layer:
    """One decoder layer's weights: norms (fp32, Gemma's 1 + w folded in) and packed linears."""

    __slots__ = ("in_norm", "post_attn_norm", "pre_ff_norm", "post_ff_norm", "q_norm", "k_norm",
                 "qk_norm", "qkv", "o", "gate_up", "down")

    def __init__(self, layer: nn.Module, linears: Mapping[str, PackedLinear], gemma: bool) -> None:
        def norm(module: nn.Module) -> Tensor:
            w = module.weight.detach().float()
            return (1.0 + w) if gemma else w.clone()

        self.in_norm = norm(layer.input_layernorm)
        self.post_attn_norm = norm(layer.post_attention_layernorm)
        self.pre_ff_norm = norm(layer.pre_feedforward_layernorm) if gemma else None
        self.post_ff_norm = norm(layer.post_feedforward_layernorm) if gemma else None
        self.q_norm = norm(layer.self_attn.q_norm) if gemma else None
        self.k_norm = norm(layer.self_attn.k_norm) if gemma else None
        self.qk_norm = None
        self.qkv, self.o = linears["qkv"], linears["o"]
        self.gate_up, self.down = linears["gate_up"], linears["down"]


def _call(linear: PackedLinear, x: Tensor) -> Tensor:   # prefill: (1, T, K) -> (1, T, N)
    return linear(x)


def _matmul(linear: PackedLinear, x: Tensor) -> Tensor:   # decode: (1, K) -> (1, N), no reshape
    return linear.matmul(x)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Engine:
    """Greedy or sampled generation of one sequence with a packed body.

    Build with :meth:`from_model` (quantizes the model's own weights) or pass packed body
    linears from a store (:func:`tensorslm.rank_store.body.pack_body`)."""

    def __init__(self, model: EngineModel, body: Mapping[str, PackedLinear], precision: Precision,
                 *, max_positions: int | None = None, scripted: bool = True) -> None:
        self.model = model
        self.shape = EngineShape.of(model)
        self.precision = precision
        s = self.shape
        gemma = s.family == "gemma3"
        layers = decoder_layers(model)
        missing = [f"layers.{i}.{n}" for i in range(s.num_layers) for n in LINEARS
                   if f"layers.{i}.{n}" not in body]
        if missing:
            raise BodyFormatError(f"the packed body lacks {len(missing)} linears, e.g. {missing[0]}")
        self.layers = [_Layer(layers[i], {n: body[f"layers.{i}.{n}"] for n in LINEARS}, gemma)
                       for i in range(s.num_layers)]
        for layer in self.layers:
            if layer.q_norm is not None:   # one (Hq+Hkv, hd) weight for the decode path
                layer.qk_norm = torch.cat([layer.q_norm.expand(s.num_heads, -1),
                                           layer.k_norm.expand(s.num_kv_heads, -1)])
        self.body = dict(body)
        w = model.model.norm.weight.detach().float()
        self.final_norm = (1.0 + w) if gemma else w.clone()
        self.act: Callable[[Tensor], Tensor] = (
            (lambda t: F.gelu(t, approximate="tanh")) if gemma else F.silu)
        self.max_positions = max_positions or int(getattr(model.config, "max_position_embeddings",
                                                          8192))
        self._rope: dict[str, tuple[Tensor, Tensor]] = {}
        self._rope_qk: dict[str, tuple[Tensor, Tensor]] = {}
        self._rope_len = 0
        self._cache: list[tuple[Tensor, Tensor]] = []
        self._cache_len = 0
        self.q_size = s.num_heads * s.head_dim
        self.kv_size = s.num_kv_heads * s.head_dim
        self._step = self._scripted_step() if scripted else None
        self._step_tables: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None

    def _scripted_step(self) -> Callable[[Tensor, int], Tensor] | None:
        """The decode step as one TorchScript call (:mod:`~tensorslm.rank_store.decode_step`)
        over this engine's weights, or None when a linear's kernel has no TorchScript call or
        scripting fails: the step then runs from Python (:meth:`_decode_python`)."""
        linears = [getattr(layer, n) for layer in self.layers for n in LINEARS]
        calls = [linear.scripted_call() for linear in linears]
        if any(c is None for c in calls):
            return None
        script = decode_step.scripted()
        if script is None:
            return None
        s = self.shape
        empty = torch.empty(0)
        kinds = [c.kind for c in calls]
        weights = [t for c in calls for t in (c.a, c.b)]
        params = [c.params for c in calls if c.params is not None]
        index = iter(range(len(params)))
        dims = [v for lin, c in zip(linears, calls)
                for v in (lin.group_size, lin.out_features, lin.in_features,
                          -1 if c.params is None else next(index))]
        norms = [w if w is not None else empty for layer in self.layers
                 for w in (layer.in_norm, layer.post_attn_norm, layer.pre_ff_norm,
                           layer.post_ff_norm)]
        qk_norms = [layer.qk_norm if layer.qk_norm is not None else empty
                    for layer in self.layers]
        windows = [-1 if w is None else w for w in s.sliding]

        counted = False

        def step(x: Tensor, pos: int) -> Tensor:
            nonlocal counted
            if not counted:
                for linear in linears:
                    linear.count_run()
                counted = True
            caches, cos, sin = self._step_tables
            return script(x, pos, norms, qk_norms, kinds, weights, dims, params, caches, cos, sin,
                          windows, self.final_norm, s.num_heads, s.num_kv_heads, s.head_dim,
                          s.eps, s.family == "gemma3")
        return step

    @property
    def scripted(self) -> bool:
        """Whether the decode step runs as one TorchScript call."""
        return self._step is not None

    @classmethod
    def from_model(cls, model: nn.Module, precision: Precision | str = Precision.FP32,
                   **kwargs: int | bool) -> Engine:
        precision = Precision.parse(precision)
        return cls(model, body_for(model, precision), precision, **kwargs)

    @property
    def body_nbytes(self) -> int:
        return sum(p.nbytes for p in self.body.values())

    @property
    def kernels(self) -> list[str]:
        return sorted({p.kernel for p in self.body.values()})

    # -- tables -----------------------------------------------------------------------------
    def _ensure(self, length: int) -> None:
        """Rotary tables and KV cache for ``length`` positions (grown in steps of 256)."""
        if length > self.max_positions:
            raise BodyFormatError(f"a sequence of {length} positions exceeds the model's "
                                  f"{self.max_positions}")
        size = min(self.max_positions, (length + 255) // 256 * 256)
        s = self.shape
        if size > self._rope_len:
            rotary = self.model.model.rotary_emb
            pos = torch.arange(size)[None]  # (1, L)
            probe = torch.zeros(1, dtype=torch.float32)
            half = s.head_dim // 2
            sign = torch.cat([-torch.ones(half), torch.ones(s.head_dim - half)])  # (hd,)
            # decode tables over the q and k heads at once, q rows pre-multiplied by the scale
            head_scale = torch.cat([torch.full((s.num_heads, 1), s.scaling),
                                    torch.ones(s.num_kv_heads, 1)])  # (Hq+Hkv, 1)
            for key in set(s.layer_rope):
                with torch.no_grad():
                    cos, sin = (rotary(probe, pos, key) if s.family == "gemma3"
                                else rotary(probe, pos))
                cos, sin = cos[0].float(), sin[0].float()  # (L, hd) each
                self._rope[key] = (cos, sin)
                self._rope_qk[key] = (cos[:, None, :] * head_scale,
                                      (sin * sign)[:, None, :] * head_scale)  # (L, Hq+Hkv, hd)
            self._rope_len = size
        if size > self._cache_len:
            self._cache = [(torch.zeros(s.num_kv_heads, size, s.head_dim),
                            torch.zeros(s.num_kv_heads, size, s.head_dim))
                           for _ in range(s.num_layers)]  # (Hkv, L, hd) each
            self._cache_len = size
            self._step_tables = None
        if self._step is not None and self._step_tables is None and self._cache:
            self._step_tables = ([t for kv in self._cache for t in kv],
                                 [self._rope_qk[key][0] for key in s.layer_rope],
                                 [self._rope_qk[key][1] for key in s.layer_rope])

    def release(self) -> None:
        """Drop the KV cache (it is rebuilt at the next query)."""
        self._cache, self._cache_len, self._step_tables = [], 0, None

    # -- forward ----------------------------------------------------------------------------
    def _norm(self, x: Tensor, w: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.shape.eps)

    def forward(self, x: Tensor, start: int) -> Tensor:
        """Hidden states (1, T, d) at positions start..start+T-1 -> final-normed (1, T, d);
        writes the KV cache for those positions (attention sees positions 0..start+T-1)."""
        s = self.shape
        t = x.shape[1]
        if t == 1:
            return self._decode(x[0], start)[None]
        end = start + t
        self._ensure(end)
        for i, layer in enumerate(self.layers):
            cos, sin = self._rope[s.layer_rope[i]]
            cos, sin = cos[start:end], sin[start:end]  # (T, hd)
            h = self._norm(x, layer.in_norm)
            qkv = layer.qkv(h)  # (1, T, Hq*hd + 2*Hkv*hd)
            q = qkv[..., :self.q_size].view(1, t, s.num_heads, s.head_dim).transpose(1, 2)
            k = qkv[..., self.q_size:self.q_size + self.kv_size].view(
                1, t, s.num_kv_heads, s.head_dim).transpose(1, 2)  # (1, Hkv, T, hd)
            v = qkv[..., self.q_size + self.kv_size:].view(
                1, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
            if layer.q_norm is not None:
                q = self._norm(q, layer.q_norm)
                k = self._norm(k, layer.k_norm)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            kc, vc = self._cache[i]
            kc[:, start:end] = k[0]
            vc[:, start:end] = v[0]
            window = s.sliding[i]
            lo = 0 if window is None else max(0, end - window - (t - 1))
            keys, values = kc[None, :, lo:end], vc[None, :, lo:end]  # (1, Hkv, S, hd)
            if t == 1:
                a = F.scaled_dot_product_attention(q, keys, values, scale=s.scaling,
                                                   enable_gqa=True)
            else:
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask(
                    start, t, lo, end, window), scale=s.scaling, enable_gqa=True)
            a = layer.o(a.transpose(1, 2).reshape(1, t, self.q_size))  # (1, T, d)
            x = self._residual_mlp(x, a, layer, _call)  # (1, T, d)
        return self._norm(x, self.final_norm)

    def _decode(self, x: Tensor, pos: int) -> Tensor:
        """One token (1, d) at ``pos`` -> final-normed (1, d): as one TorchScript call when the
        engine has it, else from Python (the same ops)."""
        if self._step is None:
            return self._decode_python(x, pos)
        self._ensure(pos + 1)
        return self._step(x, pos)

    def _decode_python(self, x: Tensor, pos: int) -> Tensor:
        """The prefill's maths for one token with the fewest tensor ops (q and k rotated
        together with the attention scale folded into the tables, attention as two batched
        matmuls over the KV heads' query groups); :mod:`~tensorslm.rank_store.decode_step`
        is the same step, op for op."""
        s = self.shape
        self._ensure(pos + 1)
        nq, nkv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        group = nq // nkv
        qk_size = self.q_size + self.kv_size
        tables = {key: (c[pos], sn[pos]) for key, (c, sn) in self._rope_qk.items()}
        for i, layer in enumerate(self.layers):
            cos, sin = tables[s.layer_rope[i]]  # (Hq+Hkv, hd) each
            qkv = layer.qkv.matmul(self._norm(x, layer.in_norm))[0]  # (Hq*hd + 2*Hkv*hd,)
            qk = qkv[:qk_size].view(nq + nkv, hd)
            if layer.qk_norm is not None:
                qk = F.rms_norm(qk, (hd,), None, s.eps) * layer.qk_norm
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)
            kc, vc = self._cache[i]
            kc[:, pos] = qk[nq:]
            vc[:, pos] = qkv[qk_size:].view(nkv, hd)
            window = s.sliding[i]
            lo = 0 if window is None else max(0, pos + 1 - window)
            scores = torch.bmm(qk[:nq].view(nkv, group, hd),
                               kc[:, lo:pos + 1].transpose(1, 2))  # (Hkv, G, S)
            a = torch.bmm(torch.softmax(scores, dim=-1), vc[:, lo:pos + 1])  # (Hkv, G, hd)
            a = layer.o.matmul(a.view(1, self.q_size))  # (1, d)
            x = self._residual_mlp(x, a, layer, _matmul)  # (1, d)
        return self._norm(x, self.final_norm)

    def _residual_mlp(self, x: Tensor, a: Tensor, layer: _Layer,
                      linear: Callable[[PackedLinear, Tensor], Tensor]) -> Tensor:
        """The rest of a layer after its attention output ``a``: the residual adds, the norms
        (Gemma puts one on each side of every block) and the gated MLP, its linears applied by
        ``linear(module, input)`` (the decode step calls the packed matmul directly)."""
        if layer.post_ff_norm is not None:   # Gemma: sandwich norms
            x = x + self._norm(a, layer.post_attn_norm)
            h = self._norm(x, layer.pre_ff_norm)
        else:
            x = x + a
            h = self._norm(x, layer.post_attn_norm)
        gate, up = linear(layer.gate_up, h).chunk(2, dim=-1)  # (..., F) each
        m = linear(layer.down, self.act(gate) * up)
        return x + (self._norm(m, layer.post_ff_norm) if layer.post_ff_norm is not None else m)

    @staticmethod
    def _mask(start: int, t: int, lo: int, end: int, window: int | None) -> Tensor:
        qpos = torch.arange(start, end)[:, None]  # (T, 1)
        kpos = torch.arange(lo, end)[None, :]  # (1, S)
        allowed = kpos <= qpos
        if window is not None:
            allowed &= kpos > qpos - window
        return allowed  # (T, S) bool

    def logits(self, hidden: Tensor) -> Tensor:
        """The model's current LM head on final hidden states (..., d) -> (..., V) fp32."""
        out = self.model.get_output_embeddings()(hidden).float()
        cap = self.shape.final_softcap
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    def embed(self, ids: Tensor) -> Tensor:
        """The model's current input embedding: ids (1, T) -> (1, T, d) fp32."""
        return self.model.get_input_embeddings()(ids).float()

    # -- generation -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Tensor:
        """Run the prompt in one pass; the last position's logits (V,)."""
        hidden = self.forward(self.embed(torch.tensor([ids], dtype=torch.long)), 0)
        return self.logits(hidden[:, -1])[0]

    @torch.inference_mode()
    def step(self, token: int, position: int) -> Tensor:
        """One decode step: the token at ``position`` -> next-token logits (V,)."""
        x = self.embed(torch.tensor([[token]], dtype=torch.long))
        return self.logits(self.forward(x, position)[:, -1])[0]

    @torch.inference_mode()
    def score(self, ids: Tensor) -> Tensor:
        """Logits for every position of one sequence (1, T) -> (T, V), one prefill pass."""
        hidden = self.forward(self.embed(ids), 0)
        return self.logits(hidden[0])

    def __call__(self, input_ids: Tensor) -> EngineOutput:
        """The causal-LM call perplexity code makes: ``engine(input_ids=ids).logits``."""
        if input_ids.shape[0] != 1:
            raise BodyFormatError(f"the engine runs one sequence; got a batch of "
                                  f"{input_ids.shape[0]}")
        return EngineOutput(self.score(input_ids)[None])

    def generate(self, ids: list[int], max_new_tokens: int, *,
                 eos: frozenset[int] = frozenset(),
                 sample: Callable[[Tensor], int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Prefill ``ids``, then decode up to ``max_new_tokens`` (stopping after an ``eos`` id);
        ``sample`` maps logits (V,) to a token (greedy argmax when None)."""
        if not ids:
            raise BodyFormatError("generate needs at least one prompt token")
        self._ensure(len(ids) + max_new_tokens)
        pick = sample or (lambda logits: int(torch.argmax(logits)))
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits = self.prefill(ids)
        position = len(ids)
        while True:
            token = pick(logits)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos or len(out) >= max_new_tokens:
                return out
            logits = self.step(token, position)
            position += 1


def sampler(temperature: float, top_p: float | None = None, top_k: int | None = None,
            generator: torch.Generator | None = None) -> Callable[[Tensor], int]:
    """Temperature sampling with optional top-k and nucleus (top-p) truncation."""
    if not temperature > 0:
        raise BodyFormatError(f"temperature must be above 0 for sampling, got {temperature}")

    def pick(logits: Tensor) -> int:
        z = logits / temperature  # (V,)
        if top_k is not None and 0 < top_k < z.shape[0]:
            kth = torch.topk(z, top_k).values[-1]
            z = z.masked_fill(z < kth, -math.inf)
        probs = torch.softmax(z, dim=-1)
        if top_p is not None and 0 < top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[order[keep]] = True
            probs = probs * mask
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator))

    return pick
