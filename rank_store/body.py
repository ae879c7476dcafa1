"""The transformer body's linear weights at a chosen precision: extracted, quantized, packed.

The body is every linear layer between the input embedding and the LM head. Per layer the
query, key and value projections are concatenated into one ``qkv`` weight and the gate and
up projections into one ``gate_up`` weight (one kernel call each instead of three and two).
:func:`quantize_body` turns the float weights into what a store keeps for a precision (codes
and scales; the float weights for ``fp32``/``bf16``), :func:`pack_body` packs those tensors
for the kernels of :mod:`tensorslm.rank_store.kernels`. Supported families: Llama (SmolLM2)
and Gemma 3.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import RankStoreError
from .memory import return_freed_memory
from .kernels import (
    DEFAULT_INT4_GROUP,
    PackedLinear,
    Precision,
    pack_int4_groups,
    pack_int8_rows,
    pack_linear,
    quantize_int4_groups,
    quantize_int4_groups_asymmetric,
    quantize_int8_rows,
)

if TYPE_CHECKING:
    from .store import RankStore

log = logging.getLogger(__name__)

#: the fused linears of every layer, in order
LINEARS = ("qkv", "o", "gate_up", "down")
SUPPORTED_FAMILIES = ("llama", "gemma3_text", "gemma3")


class BodyFormatError(RankStoreError, ValueError):
    """Body tensors that do not match the model (names, shapes) or a model family we do not run."""


def family_of(model: nn.Module) -> str:
    return family_of_type(getattr(model.config, "model_type", None))


def family_of_type(kind: str | None) -> str:
    """``llama`` or ``gemma3`` for a config's ``model_type``."""
    if kind not in SUPPORTED_FAMILIES:
        raise BodyFormatError(f"the engine runs model types {', '.join(SUPPORTED_FAMILIES)}; "
                              f"got {kind!r}")
    return "gemma3" if kind.startswith("gemma3") else "llama"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


#: reads a parameter by its ``named_parameters`` name (:meth:`LoadedModel.read_weight`)
WeightReader = Callable[[str], Tensor]


def float_body(model: nn.Module, read: WeightReader | None = None
               ) -> Iterator[tuple[str, Tensor]]:
    """``(layers.<i>.<linear>, fused fp32 (N, K) weight)`` for every layer of ``model``, one at
    a time (a caller that quantizes as it goes never holds a second fp32 body). Weights a
    skeleton load left on the meta device are fetched with ``read``."""
    family_of(model)
    names = {id(p): n for n, p in model.named_parameters()}

    def weight(lin: nn.Module) -> Tensor:
        if not lin.weight.is_meta:
            return lin.weight.detach()
        if read is None:
            raise BodyFormatError("the model's body weights were left in its checkpoint; pass "
                                  "read=LoadedModel.read_weight")
        return read(names[id(lin.weight)])

    for i, layer in enumerate(decoder_layers(model)):
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj,
                    mlp.down_proj):
            if lin.bias is not None:
                raise BodyFormatError(f"layer {i}: linear layers with a bias are not supported")
        yield f"layers.{i}.qkv", torch.cat([weight(att.q_proj), weight(att.k_proj),
                                            weight(att.v_proj)]).float()  # (Nq+2Nkv, d)
        yield f"layers.{i}.o", weight(att.o_proj).float()
        yield f"layers.{i}.gate_up", torch.cat([weight(mlp.gate_proj),
                                                weight(mlp.up_proj)]).float()  # (2F, d)
        yield f"layers.{i}.down", weight(mlp.down_proj).float()


#: int4 bodies get a zero point per group unless told otherwise (the 16 levels span each
#: group's [min, max]; docs/engine.md, "Perplexity per body precision")
INT4_ZERO_POINTS = True


#: the fused linears an int4 body keeps at int8 rows unless told otherwise, per model family
#: (:func:`family_of`). Gemma 3's shipped weights are a Q4_K_M GGUF whose qkv and gate_up (640
#: input columns, not a multiple of Q4_K's 256) are 5-bit Q5_0 in every layer, which 16 levels
#: a group do not hold. Gemma-3-270m, first 8,192 WikiText-2 test tokens, dense embedding:
#: all-int4 +17.1%, qkv at int8 +8.7%, qkv and gate_up at int8 +3.1% perplexity against fp32,
#: with no calibration; body 91 vs 63 MB (bench/results/body_int4_default.md). SmolLM2's
#: weights are Q4_1, which int4 groups with zero points reproduce (-0.01%): none.
INT4_INT8_LINEARS: Mapping[str, tuple[str, ...]] = {"llama": (), "gemma3": ("qkv", "gate_up")}


def check_int8_linears(precision: Precision, int8_linears: Collection[str]) -> frozenset[str]:
    """``int8_linears`` validated: names from :data:`LINEARS`, for an int4 body only."""
    unknown = sorted(set(int8_linears) - set(LINEARS))
    if unknown:
        raise BodyFormatError(f"int8_linears must name fused linears among {', '.join(LINEARS)}; "
                              f"got {', '.join(unknown)}")
    if int8_linears and precision is not Precision.INT4:
        raise BodyFormatError(f"int8_linears apply to int4 bodies; got precision {precision.value}")
    return frozenset(int8_linears)


def int8_linears_for(model: nn.Module, precision: Precision | str,
                     int8_linears: Collection[str] | None = None) -> frozenset[str]:
    """The linears ``model``'s ``precision`` body keeps at int8: ``int8_linears`` checked, or
    when it is None the family's :data:`INT4_INT8_LINEARS` for an int4 body (none otherwise).
    An empty ``int8_linears`` means none: an all-int4 body."""
    precision = Precision.parse(precision)
    if int8_linears is None:
        family = family_of(model)
        return frozenset(INT4_INT8_LINEARS[family] if precision is Precision.INT4 else ())
    return check_int8_linears(precision, int8_linears)


def default_int8_linears(model_type: str) -> str:
    """The family's :data:`INT4_INT8_LINEARS` for a config's ``model_type``, as an int4 body's
    meta names them (``qkv,gate_up``; ``""`` for none)."""
    kept = INT4_INT8_LINEARS[family_of_type(model_type)]
    return ",".join(lin for lin in LINEARS if lin in kept)


def quantize_body(model: nn.Module, precision: Precision | str,
                  group_size: int = DEFAULT_INT4_GROUP, *, calibration: Tensor | None = None,
                  read: WeightReader | None = None, zero_points: bool = INT4_ZERO_POINTS,
                  int8_linears: Collection[str] | None = None) -> dict[str, Tensor]:
    """The tensors a store keeps for ``precision``: ``<name>.weight`` (fp32/bf16), or
    ``<name>.codes`` int8 and ``<name>.scales`` fp32 ((N,) for int8, (N, K/g) for int4), and
    for int4 with ``zero_points`` ``<name>.zeros`` fp32 (N, K/g): ``W = codes * scale + zero``.

    ``int8_linears`` (names from :data:`LINEARS`): in an int4 body, those linears of every
    layer are kept as int8 rows instead; None: the family's :data:`INT4_INT8_LINEARS`, ``()``:
    none. ``calibration`` (token ids, (sequences, length))
    calibrates an ``int4`` body by GPTQ (:mod:`tensorslm.rank_store.gptq`; the format stays
    the same) and gives a ``w8a8`` body its input scales (:mod:`tensorslm.rank_store.smoothing`):
    int8 codes of ``W * s`` and ``<name>.smooth`` = s (K,)."""
    precision = Precision.parse(precision)
    int8_linears = int8_linears_for(model, precision, int8_linears)
    if precision is Precision.W8A8:
        return _quantize_w8a8(model, calibration, read)
    if calibration is not None:
        if precision is not Precision.INT4:
            raise BodyFormatError(f"calibration applies to int4 and w8a8 bodies; got precision "
                                  f"{precision.value}")
        from .gptq import GPTQSettings, quantize_body_gptq

        settings = GPTQSettings(group_size=group_size, asymmetric=zero_points,
                                int8_linears=int8_linears)
        return quantize_body_gptq(model, calibration, settings, progress=True)
    out: dict[str, Tensor] = {}
    for name, w in float_body(model, read):
        if precision is Precision.INT8 or name.rsplit(".", 1)[1] in int8_linears:
            codes, scales = quantize_int8_rows(w)
            out[f"{name}.codes"], out[f"{name}.scales"] = codes, scales
        elif precision is Precision.FP32:
            out[f"{name}.weight"] = w.contiguous()
        elif precision is Precision.BF16:
            out[f"{name}.weight"] = w.to(torch.bfloat16).contiguous()
        elif zero_points:
            codes, scales, zeros = quantize_int4_groups_asymmetric(w, group_size)
            out[f"{name}.codes"], out[f"{name}.scales"] = codes, scales
            out[f"{name}.zeros"] = zeros
        else:
            codes, scales = quantize_int4_groups(w, group_size)
            out[f"{name}.codes"], out[f"{name}.scales"] = codes, scales
    return out


#: the linears a ``w8a8`` body runs with int8 activations. ``down`` keeps bf16 activations (int8
#: weights all the same): its input, the gated MLP's product, has the widest outlier channels;
#: with it quantised per token too the body costs +0.83% (SmolLM2) and +1.61% (Gemma)
#: perplexity, without it +0.17% and +0.13% (bench/results/activation_quant.md)
W8A8_LINEARS = ("qkv", "o", "gate_up")


def _quantize_w8a8(model: nn.Module, calibration: Tensor | None, read: WeightReader | None
                   ) -> dict[str, Tensor]:
    from .smoothing import channel_maxima, input_scales

    maxima = None if calibration is None else channel_maxima(model, calibration)
    out: dict[str, Tensor] = {}
    for name, w in float_body(model, read):
        if maxima is not None and linear_precision(name, Precision.W8A8) is Precision.W8A8:
            s = input_scales(maxima[name], w)
            out[f"{name}.smooth"] = s
            w = w * s
        out[f"{name}.codes"], out[f"{name}.scales"] = quantize_int8_rows(w)
    return out


def pack_body(tensors: Mapping[str, Tensor], precision: Precision | str,
              num_layers: int, *, consume: bool = False,
              release: Callable[[Tensor], None] | None = None) -> dict[str, PackedLinear]:
    """Pack stored body tensors for the kernels; ``layers.<i>.<linear>`` -> :class:`PackedLinear`.
    An int4 linear with ``<name>.zeros`` has asymmetric groups, one without symmetric ones;
    one with row scales (N,) is an int8 linear kept inside the int4 body.

    ``consume``: ``tensors`` is a dict this call may empty, each entry dropped once packed, so a
    kernel that copies (the int8 planes) never holds the whole body twice. ``release``: called
    with each stored tensor of a linear whose packed form does not use it in place (views of a
    mapped file: :meth:`~tensorslm.rank_store.store.RankStore.release_range`)."""
    precision = Precision.parse(precision)
    pick = tensors.pop if consume and isinstance(tensors, dict) else tensors.__getitem__
    packed: dict[str, PackedLinear] = {}
    taken: list[Tensor] = []

    def take(key: str) -> Tensor:
        taken.append(pick(key))
        return taken[-1]

    for i in range(num_layers):
        for lin in LINEARS:
            name = f"layers.{i}.{lin}"
            taken.clear()
            try:
                if precision in (Precision.FP32, Precision.BF16):
                    packed[name] = pack_linear(take(f"{name}.weight"), precision)
                elif precision is Precision.W8A8:
                    smooth = tensors.get(f"{name}.smooth")
                    packed[name] = pack_int8_rows(
                        take(f"{name}.codes"), take(f"{name}.scales"),
                        precision=linear_precision(name, precision),
                        input_scale=None if smooth is None else 1.0 / smooth.float())
                elif precision is Precision.INT8 or tensors[f"{name}.scales"].dim() == 1:
                    packed[name] = pack_int8_rows(take(f"{name}.codes"), take(f"{name}.scales"))
                else:
                    codes, scales = take(f"{name}.codes"), take(f"{name}.scales")
                    zeros = take(f"{name}.zeros") if f"{name}.zeros" in tensors else None
                    group = codes.shape[1] // scales.shape[1]
                    packed[name] = pack_int4_groups(codes, scales, group, zeros=zeros)
                    del codes, scales, zeros
            except KeyError as exc:
                raise BodyFormatError(f"{precision.value} body tensors lack {exc.args[0]!r}") from None
            if release is not None:
                for tensor in taken:
                    if not packed[name].shares_memory_with(tensor):
                        release(tensor)
        return_freed_memory()   # a layer's packing temporaries, before the next layer's
    taken.clear()
    return packed


def body_for(model: nn.Module, precision: Precision | str,
             group_size: int = DEFAULT_INT4_GROUP, *, read: WeightReader | None = None,
             zero_points: bool = INT4_ZERO_POINTS, int8_linears: Collection[str] | None = None
             ) -> dict[str, PackedLinear]:
    """Quantize and pack ``model``'s body (no store), one linear at a time; ``zero_points``
    and ``int8_linears`` (None: the family's) as for :func:`quantize_body`."""
    precision = Precision.parse(precision)
    int8_linears = int8_linears_for(model, precision, int8_linears)
    zero_points = zero_points and precision is Precision.INT4
    return {name: pack_linear(w, Precision.INT8) if name.rsplit(".", 1)[1] in int8_linears
            else pack_linear(w, linear_precision(name, precision), group_size=group_size,
                             zero_points=zero_points)
            for name, w in float_body(model, read)}


def linear_precision(name: str, precision: Precision) -> Precision:
    """The precision body linear ``name`` runs at in a ``precision`` body: a ``w8a8`` body's
    linears outside :data:`W8A8_LINEARS` keep bf16 activations (plain int8)."""
    if precision is Precision.W8A8 and name.rsplit(".", 1)[1] not in W8A8_LINEARS:
        return Precision.INT8
    return precision


def body_nbytes(packed: Mapping[str, PackedLinear]) -> int:
    return sum(p.nbytes for p in packed.values())


def describe(packed: Mapping[str, PackedLinear]) -> dict[str, Any]:
    kernels = sorted({p.kernel for p in packed.values()})
    return {"kernels": kernels, "bytes": body_nbytes(packed)}


def store_body(store: RankStore, model: nn.Module, precision: Precision | str,
               group_size: int = DEFAULT_INT4_GROUP, *, calibration: Tensor | None = None,
               zero_points: bool = INT4_ZERO_POINTS, int8_linears: Collection[str] | None = None,
               self_written: bool = False) -> None:
    """Quantize ``model``'s body to ``precision`` once and keep it in ``store`` (with its hash,
    which covers the zeros too); ``calibration``, ``zero_points`` and ``int8_linears`` (None:
    the family's) as for :func:`quantize_body`, all named in the body's meta;
    ``self_written``: the calibration is text the model wrote
    (:func:`~tensorslm.rank_store.smoothing.self_calibration`)."""
    precision = Precision.parse(precision)
    int8_linears = int8_linears_for(model, precision, int8_linears)
    tensors = quantize_body(model, precision, group_size, calibration=calibration,
                            zero_points=zero_points, int8_linears=int8_linears)
    meta = {"precision": precision.value, "num_layers": str(len(decoder_layers(model))),
            "model_type": str(model.config.model_type),
            "group_size": str(group_size if precision is Precision.INT4 else 0)}
    if precision is Precision.INT4:
        meta["zero_points"] = "true" if zero_points else "false"
        meta["int8_linears"] = ",".join(lin for lin in LINEARS if lin in int8_linears)
    if calibration is not None:
        from .gptq import calibration_label

        label = calibration_label(calibration)
        meta["calibration"] = ((label if precision is Precision.INT4 else
                                label.replace("gptq:", "smoothquant:", 1))
                               + (" self-written" if self_written else ""))
    store.add_body(precision.value, tensors, meta)


def stored_body(store: RankStore | None, precision: Precision | str) -> str | None:
    """The body in ``store`` that serves ``precision``, or None (quantise it from the model):
    the body of that precision, else for ``w8a8`` the ``int8`` body, whose tensors are what a
    ``w8a8`` body without calibration holds (the same per-row codes, no input scales)."""
    precision = Precision.parse(precision)
    held = [] if store is None else store.body_precisions
    if precision.value in held:
        return precision.value
    if precision is Precision.W8A8 and Precision.INT8.value in held:
        return Precision.INT8.value
    return None


def load_body(store: RankStore, model: nn.Module, precision: Precision | str
              ) -> dict[str, PackedLinear]:
    """The body at ``precision`` from ``store`` (:func:`stored_body`: a ``w8a8`` body may
    come from the ``int8`` one), verified against its hash and ``model``'s shape, packed for
    this CPU's kernels."""
    precision = Precision.parse(precision)
    # none: the store's error names the bodies it holds
    source = stored_body(store, precision) or precision.value
    tensors, meta = store.map_body(source)
    layers = len(decoder_layers(model))
    if meta.get("num_layers") != str(layers) or meta.get("model_type") != model.config.model_type:
        raise BodyFormatError(f"{store.path}: the {source} body is for a "
                              f"{meta.get('model_type')} model of {meta.get('num_layers')} layers, "
                              f"the model is {model.config.model_type} with {layers}")
    expected = float_body_shapes(model)
    # bodies written before zero points carry no "zero_points" key and no zeros: symmetric
    asymmetric = precision is Precision.INT4 and meta.get("zero_points") == "true"
    for name, shape in expected.items():
        key = f"{name}.weight" if precision in (Precision.FP32, Precision.BF16) else f"{name}.codes"
        got = tuple(tensors[key].shape) if key in tensors else None
        if got != shape:
            raise BodyFormatError(f"{store.path}: body tensor {key} has shape {got}, the model "
                                  f"needs {shape}")
        int4_linear = f"{name}.scales" in tensors and tensors[f"{name}.scales"].dim() == 2
        if asymmetric and int4_linear and f"{name}.zeros" not in tensors:
            raise BodyFormatError(f"{store.path}: the int4 body's meta says zero_points true but "
                                  f"it has no {name}.zeros")
    return pack_body(tensors, precision, layers, consume=True,
                     release=functools.partial(store.release_range, f"body-{source}"))


def float_body_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``layers.<i>.<linear>`` -> (N, K) of the fused weights, without building them."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        att, mlp = layer.self_attn, layer.mlp
        d = att.q_proj.weight.shape[1]
        out[f"layers.{i}.qkv"] = (att.q_proj.weight.shape[0] + 2 * att.k_proj.weight.shape[0], d)
        out[f"layers.{i}.o"] = tuple(att.o_proj.weight.shape)
        out[f"layers.{i}.gate_up"] = (2 * mlp.gate_proj.weight.shape[0], d)
        out[f"layers.{i}.down"] = tuple(mlp.down_proj.weight.shape)
    return out


def release_linears(model: nn.Module) -> None:
    """Drop the weights of ``model``'s body linears (the engine holds its packed copies); the
    embedding, the head and the norms stay. The model's own forward no longer runs after this.

    The loader maps the weight file into memory and every parameter is a view of that map, so
    the parameters that stay are copied out of it: once nothing refers to the map, its pages
    (the whole fp32 model, read while packing) leave the resident set."""
    empty = torch.empty(0)
    for layer in decoder_layers(model):
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj,
                    mlp.down_proj):
            lin.weight = nn.Parameter(empty, requires_grad=False)
    with torch.no_grad():
        for param in model.parameters():   # shared (tied) parameters are listed once
            param.data = param.data.clone()
        for buffer in model.buffers():
            buffer.data = buffer.data.clone()
    return_freed_memory()
