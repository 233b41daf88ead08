"""Quantize any Flax Linen model by rules, without editing its code (front end of :mod:`qjax.core`).

``qmodel = quantize_model(model, rules, product="auto", backend="auto")`` has the model's ``init`` and
``apply``. Flax's method interception (``nn.intercept_methods``) sees every module method call; for a
module a rule matched, the call runs inside :func:`qjax.interception.intercepting` with a
:class:`qjax.core.Call`, so each contraction of the module's weight (``dot_general``, ``einsum``, conv,
``dot``, ``matmul``) quantizes its weight and its input operand (or runs the fused / packed op), and
activation x activation contractions take the rule's ``activations`` quantizer. A float module's call is
shielded (its contractions run plain even inside a quantized parent).

What only Linen has to know:

- variables: learned scales (LSQ steps, BiPer's alpha) live in the ``"quant"`` collection, keyed by module
  path (``INPUT_KEY`` for an input scale); frozen weights are :class:`~qjax.QArray` s in ``params``;
- partitioning metadata (``nn.Partitioned``, ``nn.LogicallyPartitioned``): read through, written back
  into the same box (its names kept);
- a module applied through a nested ``.apply`` (GPT-2's tied head ``lm_head.apply({"params": {"kernel":
  wte.T}}, h)``) has no path of its own; its path is the enclosing module's path plus its name
  (``"lm_head"`` at the root), and its weight is quantized where it is contracted;
- layers stacked by ``nn.scan`` / ``nn.vmap``: contracted per layer, so computed scales are per layer.

Per-step hyperparameters go in ``apply(..., hparams={...})`` as arrays (:mod:`qjax.qat`). The QAT product
and the kernel backend are static settings of the quantized model (:class:`qjax.core.Settings`).
``freeze(qmodel, variables, *args)`` turns the trained weights into packed QArrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.errors import FlaxError

from qjax import qat
from qjax.core import (
    AT_MODULE,
    DEQUANTIZED,
    FAKE_QUANT,
    FLOAT,
    FUSED_FLOAT,
    FUSED_PATHS,
    INT8,
    PACKED,
    Call,
    ModuleEntry,
    Record,
    Settings,
    Weight,
    execution_path,
    frozen_weight,
    initial_weight_scale,
    quantize_at_module,
    stacked_map,
)
from qjax.discovery import contracted_leaves
from qjax.interception import intercepting
from qjax.qarray import QArray, dequantize
from qjax.rules import assign, check_rules, format_table

__all__ = ["AT_MODULE", "DEQUANTIZED", "FAKE_QUANT", "FLOAT", "FUSED_FLOAT", "FUSED_PATHS", "INPUT_KEY",
           "INT8", "PACKED", "TRANSFORM_KEY", "ModuleEntry", "QuantizedModel", "float_view", "freeze",
           "get_path", "quantize_model", "serving_variables", "set_path"]

INPUT_KEY = "__input__"
TRANSFORM_KEY = "__input_transform__"  # a module's input transform (qjax.input_transform), in "quant"
KEPT_KEYS = (INPUT_KEY, TRANSFORM_KEY)  # what a frozen model keeps of the "quant" collection


def unbox(x):
    """The value inside a partitioning metadata box (``nn.Partitioned``, ...), else ``x``."""
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def rebox(old, value):
    """``value`` in ``old``'s box (names kept) when ``old`` is boxed, else ``value``."""
    return old.replace_boxed(value) if isinstance(old, nn.meta.AxisMetadata) else value


def get_path(tree: Mapping, path: tuple[str, ...], default=None):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return default
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of nested dict ``tree`` with ``value`` at ``path`` (copies only along the path)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree.get(path[0], {}), path[1:], value)
    return out


def float_view(variables: Mapping) -> dict:
    """Variables with every QArray dequantized (frozen -> float: what the unmodified model can read)."""
    return jax.tree_util.tree_map(lambda x: dequantize(x) if isinstance(x, QArray) else x, dict(variables),
                                  is_leaf=lambda x: isinstance(x, QArray))


def serving_variables(variables: Mapping, params: Mapping) -> dict:
    """Frozen variables: ``variables`` with ``params`` (holding packed QArrays) as their params. Learned
    weight scales, folded into the QArrays, leave the ``quant`` collection; learned or calibrated *input*
    scales and input transforms stay (the frozen model still quantizes and transforms its inputs)."""

    def inputs_only(tree: Mapping) -> dict:
        kept = {k: v if k in KEPT_KEYS else inputs_only(v) for k, v in tree.items()
                if k in KEPT_KEYS or isinstance(v, Mapping)}
        return {k: v for k, v in kept.items() if k in KEPT_KEYS or v}

    out = {k: v for k, v in variables.items() if k != "quant"}
    out["params"] = params
    quant = inputs_only(variables.get("quant", {}))
    if quant:
        out["quant"] = quant
    return out


def _cache_key(*trees):
    leaves, treedef = jax.tree_util.tree_flatten(trees)
    sig = tuple((x.shape, str(x.dtype)) if hasattr(x, "shape") else repr(x) for x in leaves)
    return treedef, sig


def _own_params(module: nn.Module) -> dict[str, Any]:
    """The module's own array parameters (unboxed), by name."""
    params = module.variables.get("params", {}) if module.scope is not None else {}
    return {k: unbox(v) for k, v in params.items() if not isinstance(v, Mapping)}


class _Paths:
    """Module paths of the calls on this interception's stack; a nested ``.apply`` (a root scope opened
    inside another module's call) gets the enclosing path plus its own name."""

    def __init__(self):
        self.stack: list[tuple[str, ...]] = []

    def of(self, module: nn.Module) -> tuple[str, ...]:
        path = tuple(str(p) for p in module.path)
        if not path and self.stack:
            return (*self.stack[-1], module.name or type(module).__name__)
        return path


def _param_leaves(params: Mapping):
    """``(leaves, treedef, [(module path, param name) per leaf])`` of a (possibly boxed) params tree."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = []
    for key_path, _ in flat:
        keys = tuple(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))
        names.append((keys[:-1], keys[-1]))
    return [leaf for _, leaf in flat], treedef, names


class QuantizedModel:
    """A Linen model with quantization rules applied at ``init``/``apply`` time (module docstring)."""

    def __init__(self, model: nn.Module, rules, *, product: str = "auto", backend: str = "auto",
                 residuals: str = "quantized", warn_unused: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"qjax.linen.quantize_model expects a flax.linen Module, got "
                            f"{type(model).__name__} (an nnx.Module: use qjax.nnx.quantize_model)")
        self.model = model
        self.rules = check_rules(rules)
        self.settings = Settings(product, backend, residuals)
        self.warn_unused = warn_unused
        self._tables: dict[Any, dict[str, ModuleEntry]] = {}

    # --- which module gets which rule --------------------------------------------------------------

    def _recording(self, seen: dict[tuple[str, ...], Record]):
        """Flax interception for the record pass: each module call observed into ``seen`` (by path)."""
        paths = _Paths()

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "setup" or module.scope is None:
                return next_fun(*args, **kwargs)
            path = paths.of(module)
            own = _own_params(module)
            record = seen.setdefault(path, Record(type(module).__name__, tuple(own)))
            paths.stack.append(path)
            try:
                with intercepting(record.observe(own, args).handle):
                    return next_fun(*args, **kwargs)
            finally:
                paths.stack.pop()

        return nn.intercept_methods(interceptor)

    def table(self, variables, *args, **kwargs) -> dict[str, ModuleEntry]:
        """Module path -> :class:`~qjax.core.ModuleEntry` (with its rule) for inputs like ``args``.

        ``variables`` must be the model's (``qmodel.init``'s, trained or frozen): variables without a
        ``params`` collection, or on which the model cannot run with these inputs (missing parameters,
        other shapes), are a ``ValueError`` naming what Flax reported."""
        kwargs = {k: v for k, v in kwargs.items() if k != "mutable"}
        if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
            got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
            raise ValueError(f"qjax.linen: variables must be the model's variables, a dict with a 'params' "
                             f"collection (what qmodel.init(rng, *inputs) returns), got {got}")
        key = _cache_key(variables, args, kwargs)
        if key not in self._tables:
            plain = float_view({k: v for k, v in variables.items() if k != "quant"})
            leaves, treedef, names = _param_leaves(plain.get("params", {}))
            seen: dict[tuple[str, ...], Record] = {}

            def run(ls):
                with self._recording(seen):
                    v = {**plain, "params": jax.tree_util.tree_unflatten(treedef, ls)}
                    return self.model.apply(v, *args, **{**kwargs, "mutable": True})

            try:
                contracted = {names[i] for i in contracted_leaves(run, leaves)}
            except (FlaxError, TypeError) as err:
                raise ValueError(f"qjax.linen: the model cannot run on these variables and inputs "
                                 f"({type(err).__name__}: {str(err)[:400]}); pass the variables that "
                                 "qmodel.init(rng, *inputs) returned and inputs like those") from err
            stored = {name: jax.numpy.shape(leaf) for name, leaf in zip(names, leaves, strict=True)}
            entries = [record.entry(path, {p for m, p in contracted if m == path},
                                    {p: shape for (m, p), shape in stored.items() if m == path})
                       for path, record in seen.items()]
            self._tables[key] = assign(self.rules, entries, warn=self.warn_unused)
        return self._tables[key]

    def paths(self, variables, *args, hparams: dict | None = None, **kwargs) -> dict[str, str]:
        """Module path -> how its contraction runs (:func:`qjax.core.execution_path`)."""
        hparams = qat.check_hparams(hparams)
        out = {}
        for name, entry in self.table(variables, *args, **kwargs).items():
            if entry.rule is None:
                continue
            w = get_path(variables["params"], (*entry.path, entry.weights[0])) if entry.weights else None
            w = unbox(w)
            out[name] = execution_path(entry, hparams, self.settings, w if isinstance(w, QArray) else None,
                                       None if w is None else len(w.shape) - entry.stacked)
        return out

    def dry_run(self, variables, *args, **kwargs) -> str:
        """The printable table of module path -> rule (``-`` for float); also warns about unused rules."""
        return format_table({name: e.rule for name, e in self.table(variables, *args, **kwargs).items()})

    # --- init and apply ------------------------------------------------------------------------------

    def init(self, rngs, *args, hparams: dict | None = None, **kwargs) -> dict:
        """``model.init`` plus the ``"quant"`` collection of learned scales (when a rule has one)."""
        qat.check_hparams(hparams)
        variables = dict(self.model.init(rngs, *args, **kwargs))
        table = self.table(variables, *args, **kwargs)
        quant: dict = {}
        inputs: dict = {}
        if any(e.rule is not None and qat.needs_state(e.rule.input) for e in table.values()):
            seen: dict[tuple[str, ...], Record] = {}
            with self._recording(seen):
                self.model.apply(variables, *args, **{**kwargs, "mutable": True,
                                                      "rngs": rngs if isinstance(rngs, Mapping)
                                                      else {"dropout": rngs}})
            inputs = {path: record.inputs for path, record in seen.items() if record.inputs is not None}
        for entry in table.values():
            rule = entry.rule
            if rule is None:
                continue
            for name in entry.weights:
                if qat.needs_state(rule.weight):
                    w = unbox(get_path(variables["params"], (*entry.path, name)))
                    quant = set_path(quant, (*entry.path, name),
                                     initial_weight_scale(rule.weight, w, entry.stacked))
            if qat.needs_state(rule.input) and entry.path in inputs:
                if entry.stacked:
                    raise ValueError(f"module {entry.name!r}: learned input scales of layers stacked by "
                                     "scan are not supported; use a computed input scale rule")
                quant = set_path(quant, (*entry.path, INPUT_KEY), qat.initial_scale(rule.input,
                                                                                    inputs[entry.path]))
        if quant:
            variables["quant"] = quant
        return variables

    def _prepare(self, variables: Mapping, table: Mapping[str, ModuleEntry], hparams: dict):
        """The variables the model reads (frozen weights dequantized; a weight that no interceptable op
        contracts fake-quantized where it is stored) and, per module path, the values it will hold."""
        quant = variables.get("quant", {})
        params = variables["params"]
        held: dict = {}
        for entry in table.values():
            if entry.rule is None:
                continue
            for name in entry.weights:
                where = (*entry.path, name)
                box = get_path(params, where)
                w = unbox(box)
                if w is None:
                    continue
                scale = get_path(quant, where)
                if isinstance(w, QArray):
                    value = dequantize(w)
                    held[where] = Weight(name, None, value, None, w)
                elif not entry.intercepted:
                    q = entry.rule.weight
                    value = stacked_map(lambda v, s, q=q: qat.quantize_weight(q, v, s, hparams),
                                        entry.stacked)(w, scale)
                    held[where] = Weight(name, w, value, scale)
                else:
                    held[where] = Weight(name, w, w, scale)
                    continue
                params = set_path(params, where, rebox(box, value))
        out = {k: v for k, v in variables.items() if k != "quant"}
        out["params"] = params
        return float_view(out), held

    def apply(self, variables: dict, *args, hparams: dict | None = None, **kwargs):
        """``model.apply`` with weights, inputs and activations quantized by the rules.

        ``hparams``: per-step hyperparameters (:mod:`qjax.qat`); may be traced arrays.
        """
        hparams = qat.check_hparams(hparams)
        table = self.table(variables, *args, **{k: v for k, v in kwargs.items() if k != "mutable"})
        model_vars, held = self._prepare(variables, table, hparams)
        quant = variables.get("quant", {})
        paths = _Paths()

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "setup" or module.scope is None:
                return next_fun(*args, **kwargs)
            path = paths.of(module)
            entry = table.get("/".join(path))
            rule = entry.rule if entry is not None else None
            handler = None
            if rule is not None:
                own = _own_params(module)
                weights = {}
                for name in entry.weights:
                    if name not in own:
                        continue
                    mine = held.get((*path, name))
                    if mine is not None and own[name] is mine.seen:
                        weights[name] = mine
                    else:  # inside a scan body (a per-layer slice) or a nested .apply's weight
                        weights[name] = Weight(name, own[name], own[name], get_path(quant, (*path, name)))
                input_scale = get_path(quant, (*path, INPUT_KEY))
                transform = get_path(quant, (*path, TRANSFORM_KEY))
                args = quantize_at_module(entry, args, input_scale, hparams, transform)
                if not entry.intercepted:
                    weights = {}
                handler = Call(entry, weights, hparams, self.settings, input_scale,
                               input_transform=transform).handle
            paths.stack.append(path)
            try:
                with intercepting(handler):
                    return next_fun(*args, **kwargs)
            finally:
                paths.stack.pop()

        with nn.intercept_methods(interceptor):
            return self.model.apply(model_vars, *args, **kwargs)


def freeze(qmodel: QuantizedModel, variables: dict, *args, hparams: dict | None = None, **kwargs) -> dict:
    """Trained variables -> serving variables: each quantized weight becomes a QArray with its codes packed
    in uint32 words (along the contraction axis K for Dense-like layers, else the axis needing the fewest
    words, :func:`qjax.serving.pack_axis`), exactly the codes and scales that QAT used, one set per layer of
    a stacked (scanned) module, inside the weight's partitioning box if it has one. ``args`` are sample
    inputs (shapes only matter). Learned weight scales are folded into the QArrays; learned *input* scales
    stay in the ``quant`` collection (the frozen model still quantizes its inputs)."""
    hparams = qat.check_hparams(hparams)
    table = qmodel.table(variables, *args, **kwargs)
    quant = variables.get("quant", {})
    params = variables["params"]
    for entry in table.values():
        for name in entry.weights:
            where = (*entry.path, name)
            box = get_path(params, where)
            w = unbox(box)
            if w is None or isinstance(w, QArray):
                continue
            packed = frozen_weight(entry.rule.weight, w, get_path(quant, where), hparams, entry.contract,
                                   entry.stacked)
            params = set_path(params, where, rebox(box, packed))
    return serving_variables(variables, params)


def quantize_model(model: nn.Module, rules, *, product: str = "auto", backend: str = "auto",
                   residuals: str = "quantized", warn_unused: bool = True) -> QuantizedModel:
    """Wrap a Linen model so that ``init``/``apply`` quantize it by ``rules`` (module docstring).

    ``product``: the fused QAT matmul's product (``"auto"``, ``"int8"``, ``"float"``); ``backend``: the
    packed-matmul backend of frozen weights (``"auto"``, ``"xla"``, ``"pallas"``, ``"interpret"``);
    ``residuals``: the fused op's backward operands (``"quantized"``: the exact fake-quant gradient;
    ``"original"``: the unquantized operands, as Qwix). All are static: a jitted ``qmodel.apply`` runs the
    program they choose (:class:`qjax.core.Settings`).
    Rules with a quantizer of which none matches a module are a ``ValueError`` (listing the modules qjax
    can quantize) at the first ``init``/``apply``; a rule matching nothing while others match is a warning.
    ``warn_unused=False`` (rules that may match nothing, e.g. a float baseline) turns off both.
    """
    return QuantizedModel(model, rules, product=product, backend=backend, residuals=residuals,
                          warn_unused=warn_unused)

