"""Google's Qwix (PyPI ``qwix`` 0.1.8) post-training quantization, run on the study's two models.

:func:`run_qwix` quantizes one model with one Qwix method at one configuration and returns a
:class:`QwixResult`: a jitted forward with the float forward's signature, the wall time of the
quantization, the real bytes of the quantized params and the Qwix rules used (a string); or, where Qwix
cannot do what the configuration says, ``forward=None`` and a ``reason``. Nothing is substituted silently.

Models (``model_kind``):

- ``"decoder"``: Tunix's NNX Llama3 (:mod:`experiments.decoder_lm`), an ``nnx.Module``, left untouched
  (Qwix works on clones). A batch is a token array ``[B, L]`` or the keyword arguments
  :func:`experiments.decoder_lm.model_inputs` makes of one; the forward returns the logits ``[B, L, V]``.
  Quantized (:data:`DECODER_LAYERS`): the attention projections (Tunix ``Einsum``, weight ``w``:
  ``BTD,DNH->BTNH``, ``BSD,DKH->BSKH``, ``BTNH,NHD->BTD``) and the MLP (``nnx.Linear``, ``kernel``);
  embedding, RMSNorms and ``lm_head`` stay float.
- ``"minilm"``: transformers' Linen ``FlaxBertModule`` and its ``{"params": ...}``
  (:func:`experiments.ptq_minilm.load_minilm`, batches of :func:`experiments.ptq_minilm.batches`); the
  forward returns the last hidden states ``[B, L, D]`` (``apply(..., deterministic=True)[0]``). Quantized
  (:data:`MINILM_LAYERS`): every encoder Dense layer; embeddings, LayerNorms, biases, the pooler stay float.

Methods, and the Qwix calls each makes (``rules`` as above):

- ``"rtn"``: the abstract quantized params from ``qwix.quantize_model(model, qwix.PtqProvider(rules), ...)``
  (NNX: the model itself, under ``nnx.eval_shape``; Linen: ``init`` under ``jax.eval_shape``), then
  ``qwix.quantize_params(float_params, abstract)``; inference with the ``PtqProvider`` model.
- ``"gptq"``: ``qwix.contrib.gptq.GptqRule`` rules; ``qwix.quantize_model(model,
  gptq.GptqCalibrationProvider(rules), ...)`` applied to every calibration batch (Hessians ``X X^T``
  averaged in the ``quant_stats`` collection; one pass, every layer's inputs from the float model, not layer
  by layer), then ``gptq.quantize_params(float_params, abstract, quant_stats)`` (Qwix's defaults: block 128,
  damping 0.01, no act-order); inference with ``qwix.PtqProvider(rules)``.
- ``"awq"``: ``qwix.contrib.awq.AwqRule`` (``n_grid=20``); ``awq.AwqCalibrationProvider`` (mean ``|x|`` per
  input channel), ``awq.quantize_params`` (grid search of ``s = act_scale^r``, ``r`` in 20 steps of
  ``[0, 1]``, minimising the weight error weighted by that mean ``|x|``, not the layer output's error; no
  clipping search; weights kept as ``WithAwqScale``); inference with ``awq.AwqInferenceProvider(rules)``.
- ``"smoothquant"``: ``qwix.contrib.smooth_quant.SqRule`` (``alpha=0.5``); ``sq.SqCalibrationProvider``
  (per-batch ``s`` from the input's and the weight's per-channel absmax, averaged over the batches),
  ``sq.quantize_params`` (weights times ``s = a^alpha / w^(1 - alpha)``, kept as ``WithSqScale``); inference
  with ``sq.SqInferenceProvider(rules)``.

``quantize_params`` is called once per quantized weight, on the one-weight tree, under ``jax.jit`` (weights
of one shape and rule share the compilation): Qwix's GPTQ is a Python loop over columns, which run eagerly
compiles each column's ops anew (about 1 s per column on 2 busy cores) and jitted whole unrolls every
column of every weight into one program.

What Qwix 0.1.8 does not do (found on these models). ``strict=True`` (the default) turns a ``caveat`` into a
``reason``; ``strict=False`` runs Qwix as it is and keeps the caveats in the result:

- SmoothQuant with inputs (caveat): ``SqInferenceProvider.dot_general`` multiplies the input by ``1 / s``
  and calls Qwix's core ``dot_general`` with it in float, so a smoothed layer's inputs are never quantized
  (weight-only at inference: w8a8 runs as int8 weights, float inputs). Weight-only SmoothQuant (reason):
  ``SqCalibrationProvider`` raises without ``act_qtype``; nvfp4 (reason): it builds a ``HowToQuantize``
  without tiles, refused for nvfp4.
- AWQ with inputs (caveat): ``AwqInferenceProvider`` dequantizes a ``WithAwqScale`` weight and hands the
  float array to ``PtqProvider``, which no longer sees a param and quantizes it again as a second input with
  ``act_qtype`` (dynamic, per output channel): w4a8 computes with int8 weights (codes re-derived from the
  dequantized int4 ones), and the AWQ scale is not folded into the inputs.
- GPTQ with ``"int3"`` or ``"nvfp4"`` (reason): ``gptq_core.quantize_weight`` allocates its codes as
  ``jnp.zeros_like(W, dtype=how.qtype)`` ("TODO: support synthetic qtype"), a ``TypeError`` for a type
  name numpy does not know. ``"int2"`` passes because ml_dtypes has ``int2``: GPTQ's int2 codes are
  ``jnp.int2`` arrays where RTN's and AWQ's are ``jnp.int4``.
- Calibration only records ops with one contraction axis (``calibration.CalibrationProvider``): Llama3's
  ``o_proj`` (``BTNH,NHD->BTD``: two) gets no statistics and GPTQ/AWQ/SmoothQuant quantize it by plain RTN,
  as their ``quantize_params`` document; :attr:`QwixResult.rtn_fallback_layers` lists such layers.
- ``SqCalibrationProvider`` reads ``module.kernel`` and raises on Tunix's ``Einsum`` (weight ``w``): on the
  decoder the ``SqRule`` covers the MLP, the attention projections get a plain ``QuantizationRule`` of the
  same types (RTN fallbacks).
- NNX AWQ / SmoothQuant: ``nnx.update`` refuses the ``WithAwqScale`` / ``WithSqScale`` leaves ("Cannot set
  key 'awq_scale' on immutable node of type WithAux"), and with the NNX model as the abstract tree Qwix
  turns them into pure dicts that lose ``contracting_axis``; so the abstract tree passed is a dict of the
  PTQ model's leaves and the results are set on the inference model's modules (what ``nnx.update`` does).
  (Qwix's own NNX SmoothQuant test never applies the params it makes.)

Time (``quantize_time_s``): from the first Qwix call to the quantized params being ready and installed:
the calibration model's passes over ``calib_batches`` (jitted; RTN has none), the abstract PTQ model, every
``quantize_params`` call, compilation included; not the compilation of the returned forward (jitted on
its first call).

Bytes: ``param_bytes`` sums ``nbytes`` over every array leaf of the quantized params tree (float leaves
included); ``layer_bytes`` over the quantized weights only (Qwix's ``QArray``: ``qvalue`` + ``scale``, no
``zero_point`` (symmetric); AWQ's ``awq_scale``; SmoothQuant's ``inv_sq_scale``), against
``float_layer_bytes`` of the float32 weights. Qwix stores int4 as ``jnp.int4`` arrays, ``"int3"`` and
``"int2"`` as ``jnp.int4`` too (GPTQ's int2 as ``jnp.int2``), nvfp4 as ``float4_e2m1fn``; jax reports one
byte per element for all of them (``nbytes``), which these counts use. ``packed_layer_bytes`` counts those
leaves at their storage width (4 or 2 bits per element), as a packed layout would take. Scales are float32
(nvfp4's too).

Configurations, groups and Qwix's grid: :mod:`experiments.qwix_rules`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from qwix._src.providers.ptq import WithAux
from qwix._src.utils import flax_util
from qwix.contrib import awq, gptq
from qwix.contrib import smooth_quant as sq

from experiments.qwix_rules import (
    APPLY_KWARGS,
    DECODER_LAYERS,
    METHODS,
    MINILM_LAYERS,
    MODEL_KINDS,
    QWIX_VERSION,
    SUB_BYTE,
    QwixConfig,
    build_rules,
    config_named,
    decoder_layers,
    known_limits,
    linen_layers,
    rule_string,
)


@dataclasses.dataclass
class QwixResult:
    """What :func:`run_qwix` measured (see the module docstring). ``forward`` is ``None`` exactly when
    ``reason`` says why; ``caveats`` (non-strict runs) say where the run differs from the configuration."""

    method: str
    config: str
    model_kind: str
    rule: str | None = None
    forward: Callable[[Any], jax.Array] | None = None
    quantize_time_s: float | None = None
    layer_bytes: int | None = None
    packed_layer_bytes: int | None = None
    float_layer_bytes: int | None = None
    param_bytes: int | None = None
    float_param_bytes: int | None = None
    rtn_fallback_layers: tuple[str, ...] = ()
    caveats: tuple[str, ...] = ()
    reason: str | None = None
    qwix_version: str = QWIX_VERSION

    @property
    def supported(self) -> bool:
        return self.forward is not None

    @property
    def bytes(self) -> int | None:
        """``layer_bytes``: the quantized weights (compare qjax's ``linear_bytes``)."""
        return self.layer_bytes

    @property
    def seconds(self) -> float | None:
        """``quantize_time_s``."""
        return self.quantize_time_s


# --------------------------------------------------------------------------------------------- helpers


def _decoder_inputs(batch: Any) -> dict[str, Any]:
    if isinstance(batch, dict):
        return batch
    from experiments.decoder_lm import model_inputs

    return model_inputs(jnp.asarray(batch))


def _bytes(tree: Any) -> tuple[int, int]:
    """(jax's ``nbytes`` of every array leaf, the same with sub-byte dtypes at their width)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")]
    real = sum(int(x.nbytes) for x in leaves)
    packed = sum(math.ceil(x.size * SUB_BYTE[jnp.dtype(x.dtype).name] / 8)
                 if jnp.dtype(x.dtype).name in SUB_BYTE else int(x.nbytes) for x in leaves)
    return real, packed


class _Static:
    """A hashable stand-in for a static ``jax.jit`` argument: equal to another of the same ``key``."""

    def __init__(self, value: Any, key: tuple):
        self.value, self.key = value, key

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and self.key == other.key


@functools.partial(jax.jit, static_argnums=(0, 1))
def _quantize_weight(method: str, abstract: _Static, weight: jax.Array, stats: dict) -> Any:
    """Qwix's ``quantize_params`` of ``method`` on the one-weight tree ``{"m": {name: weight}}``."""
    name = abstract.key[0]
    params, tree = {"m": {name: weight}}, {"m": {name: abstract.value}}
    if method == "rtn":
        return qwix.quantize_params(params, tree)["m"][name]
    quantize = {"gptq": gptq, "awq": awq, "smoothquant": sq}[method].quantize_params
    return quantize(params, tree, {"m": stats} if stats else {})["m"][name]


def _quantize_params(method: str, params: dict, abstract: Any,
                     stats: dict) -> tuple[dict, list[tuple], tuple[str, ...]]:
    """``(quantized params, paths of the quantized weights, those quantized without statistics)``: every
    weight that ``abstract`` (the PTQ model, or its Linen params) holds as a ``WithAux`` goes through
    :func:`_quantize_weight`, the other params stay as they are."""
    out, quantized, fallbacks = {}, [], []
    for path, weight in flax.traverse_util.flatten_dict(params).items():
        abs_w = flax_util.get_value_from_path(abstract, path)
        if not isinstance(abs_w, WithAux):
            out[path] = weight
            continue
        module_stats = flax_util.get_value_from_path(stats, path[:-1]) or {}
        own = {k: v for k, v in module_stats.items() if isinstance(k, str) and k.startswith(f"{path[-1]}_")}
        if method != "rtn" and not own:
            fallbacks.append("/".join(map(str, path[:-1])))
        template = WithAux(jax.ShapeDtypeStruct(abs_w.shape, abs_w.dtype), abs_w.how)
        key = (str(path[-1]), tuple(abs_w.shape), str(abs_w.dtype), repr(abs_w.how), tuple(sorted(own)))
        out[path] = _quantize_weight(method, _Static(template, key), weight, own)
        quantized.append(path)
    return flax.traverse_util.unflatten_dict(out), quantized, tuple(fallbacks)


def _install(model: nnx.Module, tree: dict) -> None:
    """Set every leaf of ``tree`` on ``model``: a ``WithAux`` (or subclass) replaces the attribute, an array
    becomes the Param's value; raises if a variable of ``model`` is left abstract."""
    flat = flax.traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, WithAux))
    for path, value in flat.items():
        owner = flax_util.get_value_from_path(model, path[:-1])
        if isinstance(value, WithAux):
            setattr(owner, path[-1], value)
        else:
            getattr(owner, path[-1]).set_value(value)
    left = [x for x in jax.tree.leaves(nnx.state(model)) if isinstance(x, jax.ShapeDtypeStruct)]
    if left:
        raise ValueError(f"{len(left)} variables of the quantized model are not in its params")


def _calibration_provider(method: str, rules) -> qwix.QuantizationProvider:
    return {"gptq": gptq.GptqCalibrationProvider, "awq": awq.AwqCalibrationProvider,
            "smoothquant": sq.SqCalibrationProvider}[method](rules)


def _inference_provider(method: str, rules) -> qwix.QuantizationProvider:
    return {"rtn": qwix.PtqProvider, "gptq": qwix.PtqProvider, "awq": awq.AwqInferenceProvider,
            "smoothquant": sq.SqInferenceProvider}[method](rules)


# ------------------------------------------------------------------------------------------------ flows


def _run_nnx(method: str, rules, model: nnx.Module, calib_batches: Sequence[Any]):
    example = _decoder_inputs(calib_batches[0])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stats: dict = {}
    if method != "rtn":
        # skip_nnx_init: no eager first call; the first jitted pass creates the statistics (and counts)
        calibrating = qwix.quantize_model(model, _calibration_provider(method, rules), skip_nnx_init=True,
                                          **example)
        step = nnx.jit(lambda m, inputs: m(**inputs)[0])
        for batch in calib_batches:
            step(calibrating, _decoder_inputs(batch))
        stats = nnx.to_pure_dict(nnx.state(calibrating, qwix.QuantStat))
    abstract = nnx.eval_shape(lambda: qwix.quantize_model(model, qwix.PtqProvider(rules), **example))
    qparams, quantized, fallbacks = _quantize_params(method, params, abstract, stats)
    qmodel = abstract if method in ("rtn", "gptq") else nnx.eval_shape(
        lambda: qwix.quantize_model(model, _inference_provider(method, rules), **example))
    _install(qmodel, qparams)  # what nnx.update(qmodel, qparams) does, for AWQ's and SQ's leaves too
    jax.block_until_ready(jax.tree.leaves(qparams))
    graphdef, state = nnx.split(qmodel)
    logits = jax.jit(lambda s, inputs: nnx.merge(graphdef, s)(**inputs)[0])

    def forward(batch: Any) -> jax.Array:
        return logits(state, _decoder_inputs(batch))

    return forward, qparams, quantized, fallbacks


def _run_linen(method: str, rules, module: nn.Module, variables: dict, calib_batches: Sequence[dict]):
    params = nn.meta.unbox(variables["params"])
    stats: dict = {}
    if method != "rtn":
        calibrating = qwix.quantize_model(module, _calibration_provider(method, rules))
        step = jax.jit(lambda v, b: calibrating.apply(v, **b, **APPLY_KWARGS, mutable="quant_stats")[1])
        for batch in calib_batches:
            collections = {"params": params, **({"quant_stats": stats} if stats else {})}
            stats = step(collections, batch)["quant_stats"]
    ptq_model = qwix.quantize_model(module, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(lambda: ptq_model.init(jax.random.key(0), **calib_batches[0], **APPLY_KWARGS))
    qparams, quantized, fallbacks = _quantize_params(method, params, abstract["params"], stats)
    jax.block_until_ready(jax.tree.leaves(qparams))
    qmodel = ptq_model if method in ("rtn", "gptq") else qwix.quantize_model(
        module, _inference_provider(method, rules))
    hidden = jax.jit(lambda v, b: qmodel.apply(v, **b, **APPLY_KWARGS)[0])

    def forward(batch: dict) -> jax.Array:
        return hidden({"params": qparams}, batch)

    return forward, qparams, quantized, fallbacks


def float_forward(model_kind: str, model: Any) -> Callable[[Any], jax.Array]:
    """The float model's jitted forward, with the signature of :attr:`QwixResult.forward`."""
    if model_kind == "decoder":
        graphdef, state = nnx.split(model)
        logits = jax.jit(lambda s, inputs: nnx.merge(graphdef, s)(**inputs)[0])
        return lambda batch: logits(state, _decoder_inputs(batch))
    if model_kind == "minilm":
        module, variables = model
        hidden = jax.jit(lambda v, b: module.apply(v, **b, **APPLY_KWARGS)[0])
        return lambda batch: hidden(variables, batch)
    raise ValueError(f"unknown model_kind {model_kind!r}; known: {', '.join(MODEL_KINDS)}")


def run_qwix(method: str, config: str | QwixConfig, model_kind: str, model: Any, calib_batches: Sequence[Any],
             *, module_path: str | None = None, strict: bool = True) -> QwixResult:
    """Quantize ``model`` with Qwix's ``method`` at ``config`` (a :data:`CONFIGS` name or a
    :class:`QwixConfig`), calibrating on ``calib_batches`` (RTN uses only the first, as the example input).

    ``model``: the decoder's ``nnx.Module``, or MiniLM's ``(linen module, variables)``. ``module_path``: a
    regex of the module paths to quantize (default :data:`DECODER_LAYERS` / :data:`MINILM_LAYERS`; it must
    match only modules that own a weight). ``strict``: a known deviation of Qwix from the configuration
    (``caveats``) makes the result unsupported; ``False`` runs it anyway and keeps the caveats.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"unknown model_kind {model_kind!r}; known: {', '.join(MODEL_KINDS)}")
    config = config_named(config) if isinstance(config, str) else config
    if not calib_batches:
        raise ValueError("calib_batches is empty: Qwix needs at least an example batch")
    if model_kind == "decoder":
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model_kind 'decoder' takes an nnx.Module, not {type(model).__name__}")
        module_path = module_path or DECODER_LAYERS
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        layers = decoder_layers(model, module_path)
    else:
        if not (isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module)):
            raise TypeError("model_kind 'minilm' takes (linen module, variables)")
        module_path = module_path or MINILM_LAYERS
        params = nn.meta.unbox(model[1]["params"])
        layers = linen_layers(params, module_path)
    if not layers:
        raise ValueError(f"no {model_kind} module with a weight matches module_path {module_path!r}")

    result = QwixResult(method, config.name, model_kind, float_param_bytes=_bytes(params)[0])
    caveats, reason = known_limits(method, config)
    rules, tile_reason = build_rules(method, config, layers, module_path)
    result.rule, result.caveats = (rule_string(rules) if rules else None), tuple(caveats)
    if caveats and strict:
        reason = reason or f"strict: Qwix {QWIX_VERSION} does not do {config.name}: {'; '.join(caveats)}"
    result.reason = reason or tile_reason
    if result.reason:
        return result

    start = time.perf_counter()
    run = _run_nnx if model_kind == "decoder" else _run_linen
    args = (model,) if model_kind == "decoder" else model
    forward, qparams, quantized, fallbacks = run(method, rules, *args, calib_batches)
    result.quantize_time_s = time.perf_counter() - start
    result.forward, result.rtn_fallback_layers = forward, fallbacks
    result.param_bytes = _bytes(qparams)[0]
    weights = [flax_util.get_value_from_path(qparams, p) for p in quantized]
    result.layer_bytes, result.packed_layer_bytes = _bytes(weights)
    result.float_layer_bytes = _bytes([flax_util.get_value_from_path(params, p) for p in quantized])[0]
    return result


def relative_error(out: jax.Array, ref: jax.Array) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius norms, float32)."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-30))
