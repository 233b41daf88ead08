"""Qwix's side of the study's configurations: :class:`QwixConfig` and :data:`CONFIGS`, the layers each
model quantizes, the ``qwix.QuantizationRule`` list of a method (:func:`build_rules`), and what Qwix 0.1.8
cannot do (:func:`known_limits`). :mod:`experiments.qwix_ptq` runs them.

Configurations (:data:`CONFIGS`, or any :class:`QwixConfig`; names are case- and space-blind, ``"W4 g128"``
is ``"w4_g128"``) become ``qwix.QuantizationRule`` fields: ``weight_qtype`` (``jnp.int8``, ``jnp.int4``,
Qwix's synthetic ``"int3"`` / ``"int2"``, ``"nvfp4"``), ``act_qtype`` (``None``: weight-only),
``tile_size`` (the group), and Qwix's defaults for the rest: ``weight_calibration_method="absmax"``
(symmetric), ``act_calibration_method="absmax"``, ``act_static_scale=False`` (dynamic). Without
``tile_size`` Qwix gives a weight one scale per output channel (every non-contraction axis is channelwise)
and an input one scale per token (every non-contraction axis of the input: batch and sequence), so
``w8a8`` / ``w4a8`` / ``w4a4`` are per-channel weights with per-token dynamic inputs, as the study means
them. ``nvfp4``: E2M1 values in tiles of 16 along the contraction, each tile's scale ``absmax / 6`` rounded
to E4M3 but stored as float32, no per-tensor second scale (real NVFP4 has one), for the weights and
(dynamically, per token) the inputs.

Groups: ``tile_size`` splits only the last contraction axis of a weight. A layer gets ``tile_size=g`` when
that axis is a multiple of ``g`` (the same groups as ``g`` consecutive elements of the flattened
contraction, whose fastest axis it is); a layer whose whole contraction holds exactly ``g`` elements gets
no ``tile_size`` (one scale per output channel: exactly one group of ``g`` for Llama3's ``o_proj``,
contraction ``N x H = 4 x 32``, at ``g = 128``; coarser than asked at ``g = 64``, where Qwix cannot tile
across heads, as the study's qjax rules do for that layer), in a rule of its own placed first.

Qwix's symmetric integer grid, the same for weights and dynamic inputs (``qwix/_src/core/qarray.py``
``compute_scale_zero_point``, ``numerics.py`` ``get_symmetric_bound`` and ``convert_to``): ``scale =
absmax / (qmax + 1/2)`` (int8 127.5, int4 7.5, int3 3.5, int2 1.5: qjax's ``absmax_edge``), ``q =
round(x / scale)`` (half to even), then ``jnp.int8`` / ``jnp.int4`` saturate in ``astype`` (``+absmax`` ->
``qmax``) and ``"int3"`` / ``"int2"`` are clipped to ``[-2^(b-1), 2^(b-1) - 1]``; ``-absmax`` is the tie
``-(qmax + 1/2)``, which float rounding of ``x / scale`` decides (``-2^(b-1)`` only when it is exact). A
scale below ``sqrt(finfo.tiny)`` becomes 1 (an all-zero group). nvfp4: ``scale = e4m3(absmax / 6)``, ``x /
scale`` clipped to ``[-6, 6]`` and cast to E2M1 (round to nearest even).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp
import qwix
from flax import nnx
from qwix.contrib import awq, gptq
from qwix.contrib import smooth_quant as sq

QWIX_VERSION = qwix.__version__
METHODS = ("rtn", "gptq", "awq", "smoothquant")
MODEL_KINDS = ("decoder", "minilm")
#: Module paths quantized on the decoder: every attention projection and MLP layer (not ``lm_head``).
DECODER_LAYERS = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
#: Every Dense layer of MiniLM's encoder (query, key, value, attention output, intermediate, output).
MINILM_LAYERS = (r"encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense"
                 r"|intermediate/dense|output/dense)")
APPLY_KWARGS = {"deterministic": True}  # FlaxBertModule.apply, as experiments.ptq_minilm
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "int3": "int3", "int2": "int2", "nvfp4": "nvfp4"}
#: Bits per element of the sub-byte storage dtypes (jax's ``nbytes`` counts one byte per element).
SUB_BYTE = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2}


@dataclasses.dataclass(frozen=True)
class QwixConfig:
    """``weight`` and ``act`` types (keys of ``_QTYPES``; ``act=None``: weight-only) and ``group``
    (elements per weight scale along the contraction; ``None``: one scale per output channel)."""

    name: str
    weight: str
    group: int | None = None
    act: str | None = None

    def __post_init__(self):
        for qtype in (self.weight, self.act):
            if qtype is not None and qtype not in _QTYPES:
                raise ValueError(f"{self.name}: unknown type {qtype!r}; known: {', '.join(_QTYPES)}")
        if self.group is not None and self.group < 1:
            raise ValueError(f"{self.name}: group {self.group} must be positive")
        nvfp4 = (self.weight, self.act, self.group) == ("nvfp4", "nvfp4", 16)
        if "nvfp4" in (self.weight, self.act) and not nvfp4:
            raise ValueError(f"{self.name}: Qwix's nvfp4 needs weight='nvfp4', act='nvfp4', group=16")


CONFIGS = {c.name: c for c in (
    QwixConfig("w4_g128", "int4", 128), QwixConfig("w3_g128", "int3", 128), QwixConfig("w2_g64", "int2", 64),
    QwixConfig("w8a8", "int8", None, "int8"), QwixConfig("w4a8", "int4", None, "int8"),
    QwixConfig("w4a4", "int4", None, "int4"), QwixConfig("nvfp4", "nvfp4", 16, "nvfp4"))}


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: str
    contraction: tuple[int, ...]  # sizes of the weight's contracted axes, in the weight's axis order
    has_kernel: bool  # owns a ``kernel`` (nnx.Linear / nn.Dense), else a Tunix ``Einsum`` ``w``


def config_named(name: str) -> QwixConfig:
    """The :data:`CONFIGS` entry of ``name``, case and spaces ignored (``"W4 g128"`` is ``"w4_g128"``)."""
    key = name.strip().lower().replace(" ", "_")
    if key not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[key]


# ------------------------------------------------------------------------------------------ layers, rules


def _einsum_contraction(einsum_str: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    inputs, out = einsum_str.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    return tuple(n for c, n in zip(w_spec, shape, strict=True) if c in x_spec and c not in out)


def decoder_layers(model: nnx.Module, module_path: str) -> list[_Layer]:
    layers, weightless = [], []
    for path, module in nnx.iter_modules(model):
        name = "/".join(map(str, path))
        if not re.fullmatch(module_path, name):
            continue
        if isinstance(getattr(module, "kernel", None), nnx.Param):
            layers.append(_Layer(name, (module.kernel.get_value().shape[0],), True))
        elif isinstance(getattr(module, "w", None), nnx.Param) and isinstance(
                getattr(module, "einsum_str", None), str):
            contraction = _einsum_contraction(module.einsum_str, module.w.get_value().shape)
            layers.append(_Layer(name, contraction, False))
        else:
            weightless.append(name)
    if weightless:  # Qwix would quantize the activations such a module contracts (attention scores)
        raise ValueError(f"module_path {module_path!r} matches modules without a weight: {weightless[:3]}")
    return layers


def linen_layers(params: dict, module_path: str) -> list[_Layer]:
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params))
    prefixes = {"/".join(p[:i]) for p in flat for i in range(1, len(p) - 1)}
    weightless = sorted(p for p in prefixes if re.fullmatch(module_path, p))
    if weightless:
        raise ValueError(f"module_path {module_path!r} matches modules without a weight: {weightless[:3]}")
    return [_Layer("/".join(p[:-1]), (w.shape[0],), True) for p, w in flat.items()
            if p[-1] == "kernel" and w.ndim == 2 and re.fullmatch(module_path, "/".join(p[:-1]))]


def _tiles(config: QwixConfig, layers: list[_Layer]) -> tuple[dict[int | None, list[str]], str | None]:
    """Layers by the ``tile_size`` giving them ``config.group`` (module docstring), or why there is none. A
    layer whose last contraction axis the group does not divide (Llama3's ``o_proj`` at ``g = 64``: groups
    of whole heads) gets one scale per output channel, coarser than asked: what the study's qjax rules give
    the same layer (:func:`experiments.llm_subjects.decoder_rules`), so the two stay like for like."""
    if config.group is None:
        return {None: [layer.path for layer in layers]}, None
    tiles: dict[int | None, list[str]] = {}
    bad = []
    for layer in layers:
        if layer.contraction[-1] % config.group == 0:
            tiles.setdefault(config.group, []).append(layer.path)
        elif config.weight != "nvfp4":
            tiles.setdefault(None, []).append(layer.path)
        else:
            bad.append(f"{layer.path} (contraction {' x '.join(map(str, layer.contraction))})")
    if bad:
        return tiles, (f"Qwix's tile_size splits only the last contraction axis of a weight: nvfp4's blocks "
                       f"of {config.group} do not fit that of {len(bad)} layer(s): "
                       f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    return tiles, None


def build_rules(method: str, config: QwixConfig, layers: list[_Layer],
                module_path: str) -> tuple[list[qwix.QuantizationRule], str | None]:
    """The Qwix rules of ``method`` at ``config`` for ``layers`` (those ``module_path`` matches), or
    ``([], reason)``. The largest group of layers gets one rule on ``module_path``, placed last; each other
    group (layers whose whole contraction is one group: no ``tile_size``; for SmoothQuant the layers without
    a ``kernel``: a plain ``QuantizationRule``) a rule on their exact paths, placed first (Qwix applies the
    first rule that matches a module)."""
    tiles, reason = _tiles(config, layers)
    if reason:
        return [], reason
    calibrated = {"rtn": qwix.QuantizationRule, "gptq": gptq.GptqRule, "awq": awq.AwqRule,
                  "smoothquant": sq.SqRule}[method]
    kernel = {layer.path for layer in layers if layer.has_kernel}
    groups = []
    for tile, paths in tiles.items():
        if method == "smoothquant":
            groups += [(calibrated, tile, [p for p in paths if p in kernel]),
                       (qwix.QuantizationRule, tile, [p for p in paths if p not in kernel])]
        else:
            groups.append((calibrated, tile, paths))
    groups = sorted((g for g in groups if g[2]), key=lambda g: len(g[2]))
    fields = {"weight_qtype": _QTYPES[config.weight],
              "act_qtype": _QTYPES[config.act] if config.act else None}
    rules = [cls(module_path="(" + "|".join(map(re.escape, paths)) + ")", tile_size=tile, **fields)
             for cls, tile, paths in groups[:-1]]
    cls, tile, _ = groups[-1]
    return [*rules, cls(module_path=module_path, tile_size=tile, **fields)], None


def rule_string(rules: Sequence[qwix.QuantizationRule]) -> str:
    """``rules`` as Python-like text, with the defaults Qwix's providers fill in (absmax, dynamic)."""

    def qtype(value) -> str:
        return repr(value) if isinstance(value, str) else f"jnp.{jnp.dtype(value).name}"

    base = {f.name for f in dataclasses.fields(qwix.QuantizationRule)}
    out = []
    for rule in rules:
        args = [f"module_path={rule.module_path!r}", f"weight_qtype={qtype(rule.weight_qtype)}"]
        if rule.act_qtype is not None:
            args.append(f"act_qtype={qtype(rule.act_qtype)}")
        if rule.tile_size is not None:
            args.append(f"tile_size={rule.tile_size}")
        args.append(f"weight_calibration_method={rule.weight_calibration_method!r}")
        if rule.act_qtype is not None:
            args += [f"act_calibration_method={rule.act_calibration_method or 'absmax'!r}",
                     f"act_static_scale={bool(rule.act_static_scale)}"]
        args += [f"{f.name}={getattr(rule, f.name)!r}" for f in dataclasses.fields(rule)
                 if f.name not in base]
        owner = "qwix" if type(rule) is qwix.QuantizationRule else type(rule).__module__.split(".")[-1]
        out.append(f"{owner}.{type(rule).__name__}({', '.join(args)})")
    return "[" + ", ".join(out) + "]"


def known_limits(method: str, config: QwixConfig) -> tuple[list[str], str | None]:
    """``(caveats, reason)``: where Qwix 0.1.8's ``method`` does something else than ``config`` says, and
    why it cannot run at all (module docstring)."""
    if method == "smoothquant" and config.act is None:
        return [], ("Qwix's SmoothQuant is W+A only: SqCalibrationProvider.compute_stats raises 'has no "
                    "activation quantization type specified' without act_qtype")
    if method == "smoothquant" and config.act == "nvfp4":
        return [], ("SqCalibrationProvider computes its scales with HowToQuantize(qtype, "
                    "channelwise_axes=(0,)), which Qwix refuses for nvfp4 ('requires `tiled_axes`')")
    if method == "gptq" and not _is_dtype(_QTYPES[config.weight]):
        return [], (f"Qwix's GPTQ cannot store {config.weight!r} codes: gptq_core.quantize_weight allocates "
                    "jnp.zeros_like(W, dtype=how.qtype) ('TODO: support synthetic qtype'), and numpy has no "
                    f"dtype {config.weight!r}")
    caveats = []
    if method == "smoothquant":
        caveats.append("SqInferenceProvider.dot_general feeds the smoothed input to Qwix's core dot_general "
                       f"in float: the inputs of smoothed layers are not quantized (weights {config.weight}, "
                       "inputs float)")
    if method == "awq" and config.act is not None:
        caveats.append("AwqInferenceProvider dequantizes the AWQ weight and PtqProvider quantizes that float "
                       f"array again as an input ({config.act}, dynamic, per output channel): the weights "
                       f"are rounded twice, the AWQ scale is not folded into the inputs"
                       + (f", and they compute as {config.act}, not {config.weight}"
                          if config.act != config.weight else ""))
    return caveats, None


def _is_dtype(qtype: Any) -> bool:
    try:
        jnp.dtype(qtype)
    except TypeError:
        return False
    return True
