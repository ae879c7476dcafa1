"""A decoder model's shell: what serving reads of a model, built without transformers.

The engine (:class:`~tensorslm.rank_store.engine.Engine`) never runs the Hugging Face forward:
it reads from the model its config, its norms, its rotary tables and its current input
embedding and LM head (:class:`EngineModel` says exactly what). Importing transformers'
model classes to get those costs a serving process memory (its classes, and torch's
``_dynamo`` that ``transformers.modeling_utils`` imports: ~110 MB on SmolLM2's serve, see
docs/engine.md) and start-up seconds. :class:`ModelShell` is that model's module tree with
the Hugging Face parameter names (``model.layers.<i>.self_attn.q_proj.weight``, ...): the
body linears and the input table are declared on the ``meta`` device (shapes only; the
engine packs the body itself, the store replaces the table) and
:func:`tensorslm.rank_store.skeleton.build_skeleton` reads the rest from the checkpoint.
:class:`ShellConfig` parses ``config.json`` as transformers' config classes do, and
:class:`RotaryEmbedding` computes the rotary tables as their rotary modules do (the default
rope, ``linear``, ``llama3`` and ``yarn`` scaling; Gemma 3's local and global bases).

Families: Llama (``llama``: SmolLM2) and Gemma 3 text (``gemma3_text``: Gemma-3-270m).
:func:`unsupported` names what a config asks that the shell does not model (the loader then
builds the Hugging Face model instead).
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .errors import ModelLoadError

#: model types the shell builds
SHELL_FAMILIES = ("llama", "gemma3_text")
#: rope types whose tables the shell computes (dynamic NTK and longrope change with length)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: the rotary table of a model with one rope for every layer (Llama)
DEFAULT_ROPE = "default"
_ACTIVATION = {"llama": ("hidden_act", "silu"), "gemma3_text": ("hidden_activation",
                                                                 "gelu_pytorch_tanh")}


class EngineConfig(Protocol):
    """The config fields the engine reads (:class:`ShellConfig`, or transformers' config of the
    family: the same names). Gemma 3 also: ``layer_types``, ``sliding_window``,
    ``query_pre_attn_scalar``, ``final_logit_softcapping``, ``attn_logit_softcapping``."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int


class Generation(Protocol):
    eos_token_id: int | list[int] | None


class Rotary(Protocol):
    def __call__(self, x: Tensor, position_ids: Tensor, layer_type: str = ...
                 ) -> tuple[Tensor, Tensor]: ...


class Stack(Protocol):
    """The decoder stack: ``layers[i]`` hold the norms (``input_layernorm``,
    ``post_attention_layernorm``; Gemma 3 also ``pre_feedforward_layernorm``,
    ``post_feedforward_layernorm`` and ``self_attn.q_norm``/``k_norm``)."""

    layers: Sequence[nn.Module]
    norm: nn.Module
    rotary_emb: Rotary


class EngineModel(Protocol):
    """Everything the engine and the agent read of a model: a Hugging Face causal LM of a
    supported family or a :class:`ModelShell`. ``rotary_emb(x, pos)`` gives Llama's tables,
    ``rotary_emb(x, pos, layer_type)`` Gemma 3's."""

    config: EngineConfig
    model: Stack
    generation_config: Generation

    def get_input_embeddings(self) -> nn.Module: ...

    def get_output_embeddings(self) -> nn.Module: ...


@dataclass(frozen=True)
class RopeSpec:
    """One rotary table's parameters (a ``rope_parameters`` entry, standardised)."""

    rope_type: str
    theta: float
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None      # llama3
    high_freq_factor: float | None = None     # llama3
    attention_factor: float | None = None     # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0

    @classmethod
    def parse(cls, params: Mapping[str, Any], *, truncate: bool) -> RopeSpec:
        return cls(rope_type=params["rope_type"], theta=float(params["rope_theta"]),
                   factor=params.get("factor"),
                   original_max_position_embeddings=params.get("original_max_position_embeddings"),
                   low_freq_factor=params.get("low_freq_factor"),
                   high_freq_factor=params.get("high_freq_factor"),
                   attention_factor=params.get("attention_factor"),
                   beta_fast=params.get("beta_fast"), beta_slow=params.get("beta_slow"),
                   mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                   truncate=truncate,
                   partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)))


@dataclass
class ShellConfig:
    """The fields of ``config.json`` the engine, the loader and ``install`` read, with
    transformers' defaults for the family where the file leaves one out. Mutable like a
    transformers config (``install`` unties the head by clearing ``tie_word_embeddings``)."""

    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict[str, RopeSpec]   # key: DEFAULT_ROPE (Llama) or a layer type (Gemma 3)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    layer_types: list[str] | None = None          # Gemma 3
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ShellConfig:
        why = unsupported(raw)
        if why is not None:
            raise ModelLoadError(f"the model shell cannot describe this config: {why}")
        kind = raw["model_type"]
        gemma = kind == "gemma3_text"
        defaults = _GEMMA3_DEFAULTS if gemma else _LLAMA_DEFAULTS

        def get(key: str) -> Any:   # the file's value, else transformers' default
            return raw[key] if key in raw else defaults.get(key)

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        layers = int(get("num_hidden_layers"))
        layer_types = None
        if gemma:
            pattern = int(raw.get("sliding_window_pattern", 6))
            layer_types = list(raw.get("layer_types") or [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(layers)])
        return cls(
            model_type=kind, architectures=tuple(raw.get("architectures") or ()),
            vocab_size=int(get("vocab_size")), hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")), num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            rms_norm_eps=float(get("rms_norm_eps")),
            max_position_embeddings=int(get("max_position_embeddings")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            rope=_rope_specs(raw, defaults, layer_types),
            pad_token_id=get("pad_token_id"), bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"), layer_types=layer_types,
            sliding_window=get("sliding_window") if gemma else None,
            query_pre_attn_scalar=get("query_pre_attn_scalar") if gemma else None,
            final_logit_softcapping=raw.get("final_logit_softcapping"),
            attn_logit_softcapping=raw.get("attn_logit_softcapping"))

    @classmethod
    def from_directory(cls, directory: Path) -> ShellConfig:
        return cls.from_dict(_read_json(Path(directory) / "config.json"))


# transformers' class defaults for the fields above (LlamaConfig, Gemma3TextConfig)
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "rope_theta": 10000.0}
_GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 131_072, "tie_word_embeddings": True,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}


def unsupported(raw: Mapping[str, Any]) -> str | None:
    """What in a ``config.json`` the shell (and the engine) does not model, or None."""
    kind = raw.get("model_type")
    if kind not in SHELL_FAMILIES:
        return f"model type {kind!r} (the shell builds {', '.join(SHELL_FAMILIES)})"
    key, expected = _ACTIVATION[kind]
    if raw.get(key, expected) != expected:
        return f"{key} {raw[key]!r} (the engine runs {expected})"
    for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if raw.get(flag):
            return f"{flag} is set"
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor {raw['partial_rotary_factor']}"
    gemma = kind == "gemma3_text"
    layer_types = (raw.get("layer_types") or ["sliding_attention", "full_attention"]
                   if gemma else None)
    try:
        specs = _rope_specs(raw, _GEMMA3_DEFAULTS if gemma else _LLAMA_DEFAULTS, layer_types)
    except (KeyError, TypeError, ValueError) as exc:
        return f"rope parameters it cannot read ({type(exc).__name__}: {exc})"
    for key, spec in specs.items():
        if spec.rope_type not in ROPE_TYPES:
            return (f"rope type {spec.rope_type!r} for {key} (the shell computes "
                    f"{', '.join(ROPE_TYPES)})")
        if spec.partial_rotary_factor != 1.0:
            return f"partial_rotary_factor {spec.partial_rotary_factor} for {key}"
    return None


def _rope_specs(raw: Mapping[str, Any], defaults: Mapping[str, Any],
                layer_types: Sequence[str] | None) -> dict[str, RopeSpec]:
    """``rope_parameters`` standardised as transformers' configs do (legacy ``rope_theta``,
    ``rope_scaling`` and Gemma's ``rope_local_base_freq`` included)."""
    scaling = copy.deepcopy(raw.get("rope_scaling"))
    params = copy.deepcopy(raw.get("rope_parameters"))
    max_positions = raw.get("max_position_embeddings", defaults["max_position_embeddings"])

    def standardise(entry: dict[str, Any], theta: float) -> dict[str, Any]:
        entry.setdefault("rope_type", entry.get("type", "default"))
        entry.setdefault("rope_theta", theta)
        if entry["rope_type"] in ("llama3", "yarn", "longrope"):
            if layer_types is None and "original_max_position_embeddings" in raw:
                entry["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
            entry.setdefault("original_max_position_embeddings", max_positions)
        return entry

    if layer_types is None:   # Llama: one table; rope_scaling replaces rope_parameters
        entry = standardise(dict(scaling or params or {}),
                            raw.get("rope_theta", defaults["rope_theta"]))
        return {DEFAULT_ROPE: RopeSpec.parse(entry, truncate=bool(entry.get("truncate", True)))}
    # Gemma 3: one table per layer type; rope_scaling applies to the global (full) layers
    params = params if params is not None else {"sliding_attention": {"rope_type": "default"},
                                                "full_attention": {"rope_type": "default"}}
    if scaling is not None:
        params["full_attention"].update(scaling)
    if params.get("full_attention") is None:
        params["full_attention"] = {"rope_type": "default"}
    params["full_attention"].setdefault("rope_theta", raw.get("rope_theta",
                                                              defaults["rope_theta"]))
    if params.get("sliding_attention") is None:
        params["sliding_attention"] = {"rope_type": "default"}
    params["sliding_attention"].setdefault("rope_theta", raw.get(
        "rope_local_base_freq", defaults["rope_local_base_freq"]))
    truncate = bool(params.get("truncate", True))   # yarn reads the outer dict, as transformers
    return {key: RopeSpec.parse(standardise(params[key], raw.get("rope_theta",
                                                                  defaults["rope_theta"])),
                                truncate=truncate)
            for key in sorted(set(layer_types))}


def inverse_frequencies(spec: RopeSpec, head_dim: int, max_positions: int
                        ) -> tuple[Tensor, float]:
    """``(inv_freq (head_dim/2,) fp32, attention scaling)`` of one rotary table, computed with
    transformers' operations in their order (so the tables are bit-identical)."""
    dim = int(head_dim * spec.partial_rotary_factor)
    base = spec.theta
    if spec.rope_type in ("default", "linear", "llama3"):
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
        inv_freq = 1.0 / (base ** exponents)  # (dim/2,)
        if spec.rope_type == "linear":
            inv_freq /= _required(spec, spec.factor, "factor")
        elif spec.rope_type == "llama3":
            inv_freq = _llama3(spec, inv_freq)
        return inv_freq, 1.0
    if spec.rope_type == "yarn":
        return _yarn(spec, dim, max_positions)
    raise ModelLoadError(f"rope type {spec.rope_type!r}: the shell computes "
                         f"{', '.join(ROPE_TYPES)}")


def _required(spec: RopeSpec, value: Any, name: str) -> Any:
    if value is None:
        raise ModelLoadError(f"rope type {spec.rope_type!r} needs {name} in the config's "
                             f"rope parameters; got none")
    return value


def _llama3(spec: RopeSpec, inv_freq: Tensor) -> Tensor:
    factor = _required(spec, spec.factor, "factor")
    low = _required(spec, spec.low_freq_factor, "low_freq_factor")
    high = _required(spec, spec.high_freq_factor, "high_freq_factor")
    old_context = _required(spec, spec.original_max_position_embeddings,
                            "original_max_position_embeddings")
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(spec: RopeSpec, dim: int, max_positions: int) -> tuple[Tensor, float]:
    base = spec.theta
    original = _required(spec, spec.original_max_position_embeddings,
                         "original_max_position_embeddings")
    factor = spec.factor if spec.factor is not None else max_positions / original

    def mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = spec.attention_factor
    if attention is None:
        attention = (float(mscale(factor, spec.mscale) / mscale(factor, spec.mscale_all_dim))
                     if spec.mscale and spec.mscale_all_dim else mscale(factor))

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(spec.beta_fast or 32), correction_dim(spec.beta_slow or 1)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation)
                + (1.0 / pos_freqs) * extrapolation)
    return inv_freq, attention


class RotaryEmbedding(nn.Module):
    """Rotary cos/sin tables, called as transformers' rotary modules are:
    ``(x, position_ids (B, L)[, layer_type]) -> (cos, sin)``, each (B, L, head_dim) in x's dtype."""

    def __init__(self, config: ShellConfig) -> None:
        super().__init__()
        self.tables = {key: inverse_frequencies(spec, config.head_dim,
                                                config.max_position_embeddings)
                       for key, spec in config.rope.items()}

    def forward(self, x: Tensor, position_ids: Tensor, layer_type: str = DEFAULT_ROPE
                ) -> tuple[Tensor, Tensor]:
        if layer_type not in self.tables:
            raise ModelLoadError(f"no rotary table {layer_type!r}; the model has "
                                 f"{', '.join(self.tables)}")
        inv_freq, scaling = self.tables[layer_type]
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, head_dim)
        return (emb.cos() * scaling).to(dtype=x.dtype), (emb.sin() * scaling).to(dtype=x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Gemma's input embedding: rows times ``embed_scale`` (sqrt(hidden), fp32 buffer)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
                 embed_scale: float, _weight: Tensor | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, _weight=_weight)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class _Norm(nn.Module):
    """An RMS norm's weight (the engine applies it; Gemma's is ``1 + w``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)


class _MetaLinear(nn.Linear):
    """A bias-free linear declared on ``meta`` without an initialisation (torch's initialisers
    on ``meta`` tensors import ``torch._dynamo``)."""

    def reset_parameters(self) -> None:
        pass


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return _MetaLinear(in_features, out_features, bias=False, device="meta").requires_grad_(False)


def _meta_table(c: ShellConfig) -> Tensor:
    return torch.empty(c.vocab_size, c.hidden_size, device="meta")  # (V, d), no initialisation


class _Attention(nn.Module):
    def __init__(self, c: ShellConfig, gemma: bool) -> None:
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = _linear(d, c.num_attention_heads * hd)
        self.k_proj = _linear(d, c.num_key_value_heads * hd)
        self.v_proj = _linear(d, c.num_key_value_heads * hd)
        self.o_proj = _linear(c.num_attention_heads * hd, d)
        if gemma:
            self.q_norm, self.k_norm = _Norm(hd), _Norm(hd)


class _MLP(nn.Module):
    def __init__(self, c: ShellConfig) -> None:
        super().__init__()
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size)


class _Layer(nn.Module):
    def __init__(self, c: ShellConfig, gemma: bool) -> None:
        super().__init__()
        self.self_attn = _Attention(c, gemma)
        self.mlp = _MLP(c)
        self.input_layernorm = _Norm(c.hidden_size)
        self.post_attention_layernorm = _Norm(c.hidden_size)
        if gemma:
            self.pre_feedforward_layernorm = _Norm(c.hidden_size)
            self.post_feedforward_layernorm = _Norm(c.hidden_size)


class _Stack(nn.Module):
    def __init__(self, c: ShellConfig, gemma: bool) -> None:
        super().__init__()
        self.embed_tokens: nn.Module = (
            ScaledEmbedding(c.vocab_size, c.hidden_size, c.pad_token_id, c.hidden_size ** 0.5,
                            _weight=_meta_table(c)) if gemma
            else nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id, _weight=_meta_table(c)))
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(_Layer(c, gemma) for _ in range(c.num_hidden_layers))
        self.norm = _Norm(c.hidden_size)
        self.rotary_emb = RotaryEmbedding(c)


@dataclass(frozen=True)
class GenerationDefaults:
    """``generation_config.json`` (else the config's ids): where generation stops."""

    eos_token_id: int | list[int] | None
    bos_token_id: int | None = None
    pad_token_id: int | None = None


class ModelShell(nn.Module):
    """A causal LM's module tree without a forward: parameter names as transformers names
    them, every parameter on the ``meta`` device until the loader fills it. Satisfies
    :class:`EngineModel`; ``install`` swaps its embedding and head as in a transformers model."""

    def __init__(self, config: ShellConfig,
                 generation_config: GenerationDefaults | None = None) -> None:
        super().__init__()
        gemma = config.model_type == "gemma3_text"
        self.config = config
        self.generation_config = generation_config or GenerationDefaults(
            config.eos_token_id, config.bos_token_id, config.pad_token_id)
        self.model = _Stack(config, gemma)
        self.lm_head: nn.Module = _linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_directory(cls, directory: Path) -> ModelShell:
        """The shell of a Hugging Face directory's ``config.json`` (and
        ``generation_config.json`` where it has one), parameters still on ``meta``."""
        directory = Path(directory)
        config = ShellConfig.from_directory(directory)
        generation = None
        if (directory / "generation_config.json").is_file():
            raw = _read_json(directory / "generation_config.json")
            generation = GenerationDefaults(raw.get("eos_token_id"), raw.get("bos_token_id"),
                                            raw.get("pad_token_id"))
        return cls(config, generation).eval()

    @property
    def architecture(self) -> str:
        """The transformers class the checkpoint was saved from (``LlamaForCausalLM``, ...)."""
        return self.config.architectures[0] if self.config.architectures else type(self).__name__

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.model.embed_tokens = module

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.lm_head = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelLoadError("a model shell has no forward: serve it with the engine "
                             "(tensorslm.rank_store.engine.Engine), or load the whole model")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
