"""Quantize any Flax Linen model by rules, without editing its code.

``qmodel = quantize_model(model, rules)`` gives an object with the model's ``init`` and ``apply``:

- weights: before the model runs, every parameter named in a matching rule's ``weight_names`` is replaced by
  its fake-quantized value (the model reads it as usual, so any module that contracts a weight works:
  Dense, DenseGeneral, Conv, Einsum, Embed, or a module written elsewhere);
- inputs: Flax's method interception (``nn.intercept_methods``) fake-quantizes the first positional input of
  each matched module's ``__call__``;
- activations: inside a matched module with an ``activations`` quantizer (attention), both operands of each
  ``jnp.einsum`` / ``lax.dot_general`` run directly in its ``__call__`` (``q k^T``, ``p v``) are quantized.

A rule applies to a module that its path and types match and that owns one of the rule's weight parameters,
or that the rule names by type. Learned scales (LSQ steps, BiPer's alpha) live in the ``"quant"`` variable
collection, keyed by module path. Per-step hyperparameters go in ``apply(..., hparams={...})`` as arrays
(:mod:`qjax.qat`), so schedules never recompile.

``freeze(qmodel, variables, *args)`` turns the trained weights into packed :class:`~qjax.QArray` codes;
``qmodel.apply`` runs a frozen model too, with Dense and single-axis DenseGeneral layers on
:func:`kernels_pallas.packed_matmul` and any other module on the dequantized weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax import qat
from qjax.int_matmul import current_product, integer_eligible, qat_matmul
from qjax.qarray import QArray, dequantize
from qjax.quantizer import quantize
from qjax.rules import Rule, check_rules, format_table
from qjax.serving import frozen_matmul, pack_for_serving, packed_layout

INPUT_KEY = "__input__"


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    """One module of a traced model: its path, class name, own parameters and matched rule."""

    path: tuple[str, ...]
    type_name: str
    params: tuple[str, ...]
    rule: Rule | None
    contract: int = 0  # contracting axes of a Dense (1) / DenseGeneral on trailing axes; 0: not a matmul

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def weights(self) -> tuple[str, ...]:
        return tuple(p for p in self.params if self.rule and self.rule.weight and p in self.rule.weight_names)


def _contracting_axes(module: nn.Module, x) -> int:
    """How many axes a Dense-like module contracts (0 when it is not one qjax runs as a matmul):
    Dense, or a DenseGeneral without batch dims over one axis or over the trailing axes in order."""
    if isinstance(module, nn.Dense):
        return 1
    if isinstance(module, nn.DenseGeneral) and not module.batch_dims and hasattr(x, "ndim"):
        axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        if len(axes) == 1 or [a % x.ndim for a in axes] == list(range(x.ndim - len(axes), x.ndim)):
            return len(axes)
    return 0


def _eligible(rule: Rule, path: str, type_name: str, params: tuple[str, ...]) -> bool:
    owns_weight = any(p in rule.weight_names for p in params)
    return rule.matches(path, type_name) and (owns_weight or bool(rule.types))


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
    scales stay (the frozen model still quantizes its inputs with them)."""

    def inputs_only(tree: Mapping) -> dict:
        kept = {k: v if k == INPUT_KEY else inputs_only(v) for k, v in tree.items()
                if k == INPUT_KEY or isinstance(v, Mapping)}
        return {k: v for k, v in kept.items() if k == INPUT_KEY or v}

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


class QuantizedModel:
    """A Linen model with quantization rules applied at ``init``/``apply`` time (module docstring)."""

    def __init__(self, model: nn.Module, rules, *, warn_unused: bool = True):
        if not isinstance(model, nn.Module):
            raise ValueError(f"quantize_model expects a flax.linen Module, got {type(model).__name__}")
        self.model = model
        self.rules = check_rules(rules)
        self.warn_unused = warn_unused
        self._tables: dict[Any, dict[str, ModuleEntry]] = {}

    # --- which module gets which rule --------------------------------------------------------------

    def _record(self, modules: dict, inputs: dict | None = None):
        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.scope is not None:
                module = context.module
                own = tuple(k for k, v in module.variables.get("params", {}).items()
                            if not isinstance(v, Mapping))
                path = tuple(str(p) for p in module.path)
                contract = _contracting_axes(module, args[0]) if args else 0
                modules.setdefault(path, (type(module).__name__, own, contract))
                if inputs is not None and args:
                    inputs.setdefault(path, args[0])
            return next_fun(*args, **kwargs)

        return nn.intercept_methods(interceptor)

    def _entries(self, modules: dict) -> dict[str, ModuleEntry]:
        table = {}
        for path, (type_name, own, contract) in modules.items():
            name = "/".join(path)
            rule = next((r for r in self.rules if _eligible(r, name, type_name, own)), None)
            table[name] = ModuleEntry(path, type_name, own, rule, contract)
        if self.warn_unused:
            used = {id(e.rule) for e in table.values()}
            unused = [r.label for r in self.rules if id(r) not in used]
            if unused:
                import warnings

                warnings.warn(f"qjax rules matched no module: {unused}; modules: {sorted(table)[:20]}",
                              stacklevel=3)
        return table

    def table(self, variables, *args, **kwargs) -> dict[str, ModuleEntry]:
        """Module path -> :class:`ModuleEntry` (with its rule) for this model on inputs like ``args``."""
        key = _cache_key(variables, args, kwargs)
        if key not in self._tables:
            modules: dict = {}
            plain = {k: v for k, v in variables.items() if k != "quant"}

            def run(v):
                with self._record(modules):
                    return self.model.apply(float_view(v), *args, **{**kwargs, "mutable": True})

            jax.eval_shape(run, plain)
            self._tables[key] = self._entries(modules)
        return self._tables[key]

    def paths(self, variables, *args, hparams: dict | None = None, **kwargs) -> dict[str, str]:
        """Module path -> how its contraction runs (:func:`execution_path`) for these variables."""
        hparams = qat.check_hparams(hparams)
        table = self.table(variables, *args, **kwargs)
        return {name: execution_path(e, variables["params"], hparams) for name, e in table.items()
                if e.rule is not None}

    def dry_run(self, variables, *args, **kwargs) -> str:
        """The printable table of module path -> rule (``-`` for float); also warns about unused rules."""
        return format_table({name: e.rule for name, e in self.table(variables, *args, **kwargs).items()})

    # --- init and apply ------------------------------------------------------------------------------

    def init(self, rngs, *args, hparams: dict | None = None, **kwargs) -> dict:
        """``model.init`` plus the ``"quant"`` collection of learned scales (when a rule has one)."""
        qat.check_hparams(hparams)
        variables = dict(self.model.init(rngs, *args, **kwargs))
        modules: dict = {}
        inputs: dict = {}
        apply_kwargs = {**kwargs, "mutable": True,
                        "rngs": rngs if isinstance(rngs, Mapping) else {"dropout": rngs}}
        with self._record(modules, inputs):
            self.model.apply(variables, *args, **apply_kwargs)
        table = self._entries(modules)
        quant: dict = {}
        for entry in table.values():
            rule = entry.rule
            if rule is None:
                continue
            for name in entry.weights:
                if qat.needs_state(rule.weight):
                    w = get_path(variables["params"], (*entry.path, name))
                    quant = set_path(quant, (*entry.path, name), qat.initial_scale(rule.weight, w))
            if qat.needs_state(rule.input) and entry.path in inputs:
                scale = qat.initial_scale(rule.input, inputs[entry.path])
                quant = set_path(quant, (*entry.path, INPUT_KEY), scale)
        if quant:
            variables["quant"] = quant
        return variables

    def _model_variables(self, variables: dict, table: dict[str, ModuleEntry], hparams: dict) -> dict:
        quant = variables.get("quant", {})
        params = variables["params"]
        for entry in table.values():
            if execution_path(entry, params, hparams) in FUSED_PATHS:
                continue  # the interceptor quantizes this weight itself
            for name in entry.weights:
                where = (*entry.path, name)
                w = get_path(params, where)
                if isinstance(w, QArray):
                    if not _runs_packed(entry, w):
                        params = set_path(params, where, dequantize(w))
                    continue
                scale = get_path(quant, where)
                params = set_path(params, where, qat.quantize_weight(entry.rule.weight, w, scale, hparams))
        out = {k: v for k, v in variables.items() if k != "quant"}
        out["params"] = params
        return float_view(out)

    def apply(self, variables: dict, *args, hparams: dict | None = None, **kwargs):
        """``model.apply`` with weights, inputs and activations quantized by the rules.

        ``hparams``: per-step hyperparameters (:mod:`qjax.qat`); may be traced arrays.
        """
        hparams = qat.check_hparams(hparams)
        table = self.table(variables, *args, **{k: v for k, v in kwargs.items() if k != "mutable"})
        model_vars = self._model_variables(variables, table, hparams)
        quant = variables.get("quant", {})
        with self._interception(table, quant, variables["params"], hparams):
            return self.model.apply(model_vars, *args, **kwargs)

    @contextlib.contextmanager
    def _interception(self, table, quant, params, hparams):
        active: list = []  # the activations quantizer of each module call on the stack

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or context.module.scope is None:
                return next_fun(*args, **kwargs)
            entry = table.get("/".join(str(p) for p in context.module.path))
            rule = entry.rule if entry else None
            path = execution_path(entry, params, hparams) if entry is not None else FLOAT
            input_scale = get_path(quant, (*entry.path, INPUT_KEY)) if entry is not None else None
            if path in FUSED_PATHS:
                w = get_path(params, (*entry.path, entry.weights[0]))
                w_scale = get_path(quant, (*entry.path, entry.weights[0]))
                product = "int8" if path == INT8 else "float"
                return _dense_like_call(context.module, args[0], lambda x: qat_matmul(
                    x, w, rule.weight, rule.input, input_scale, w_scale, hparams, entry.contract, product))
            if rule is not None and rule.input is not None and args:
                args = (qat.quantize_input(rule.input, args[0], input_scale, hparams), *args[1:])
            active.append(rule.activations if rule is not None else None)
            try:
                if path == PACKED:
                    w = get_path(params, (*entry.path, entry.weights[0]))
                    return _dense_like_call(context.module, args[0], lambda x: frozen_matmul(x, w))
                return next_fun(*args, **kwargs)
            finally:
                active.pop()

        with nn.intercept_methods(interceptor), _quantized_contractions(active, hparams):
            yield


@contextlib.contextmanager
def _quantized_contractions(active: list, hparams: dict):
    """While active, ``jnp.einsum`` and ``lax.dot_general`` quantize their array operands whenever the
    innermost module call has an ``activations`` quantizer."""
    original_einsum, original_dot_general = jnp.einsum, jax.lax.dot_general

    def q(x):
        return qat.quantize_input(active[-1], x, None, hparams) if isinstance(x, jax.Array) else x

    def einsum(subscripts, *operands, **kwargs):
        if active and active[-1] is not None:
            operands = tuple(q(o) for o in operands)
        return original_einsum(subscripts, *operands, **kwargs)

    def dot_general(lhs, rhs, *args, **kwargs):
        if active and active[-1] is not None:
            lhs, rhs = q(lhs), q(rhs)
        return original_dot_general(lhs, rhs, *args, **kwargs)

    jnp.einsum, jax.lax.dot_general = einsum, dot_general
    try:
        yield
    finally:
        jnp.einsum, jax.lax.dot_general = original_einsum, original_dot_general


# --- frozen models -----------------------------------------------------------------------------------

def _runs_packed(entry: ModuleEntry, w: QArray) -> bool:
    return entry.contract == 1 and packed_layout(w) is not None


def _dense_like_call(module: nn.Module, x: jax.Array, matmul) -> jax.Array:
    """A Dense / DenseGeneral layer with its contraction done by ``matmul(x (..., *K))``."""
    axes = getattr(module, "axis", -1)
    if isinstance(module, nn.DenseGeneral) and (not isinstance(axes, tuple) or len(axes) == 1):
        x = jnp.moveaxis(x, axes[0] if isinstance(axes, tuple) else axes, -1)
    dtype = module.dtype or x.dtype
    y = matmul(x).astype(dtype)
    if module.use_bias:
        y = y + module.variables["params"]["bias"].astype(dtype)
    return y


FLOAT, FAKE_QUANT, INT8, FUSED_FLOAT, PACKED, DEQUANTIZED = (
    "float", "fake-quant float", "int8 dot_general", "fused fake-quant float", "packed matmul",
    "dequantized float")
FUSED_PATHS = (INT8, FUSED_FLOAT)  # one custom-VJP op for the quantized contraction (qjax.int_matmul)


def execution_path(entry: ModuleEntry | None, params: Mapping, hparams: dict) -> str:
    """How a module's contraction runs: ``float`` (no weight quantizer), ``int8 dot_general`` or ``fused
    fake-quant float`` (QAT with integer codes as one custom-VJP op, :func:`qjax.int_matmul.qat_matmul`,
    its product chosen by :func:`qjax.int_matmul.qat_product`), ``fake-quant float``, ``packed matmul``
    (frozen, integer codes) or ``dequantized float`` (frozen, other formats or layouts)."""
    if entry is None or not entry.weights:
        return FLOAT
    w = get_path(params, (*entry.path, entry.weights[0]))
    if isinstance(w, QArray):
        return PACKED if _runs_packed(entry, w) else DEQUANTIZED
    if entry.contract and len(entry.weights) == 1 and integer_eligible(
            entry.rule.weight, entry.rule.input, hparams, jnp.ndim(w), entry.contract):
        return INT8 if current_product() == "int8" else FUSED_FLOAT
    return FAKE_QUANT


def freeze(qmodel: QuantizedModel, variables: dict, *args, hparams: dict | None = None, **kwargs) -> dict:
    """Trained variables -> serving variables: each quantized weight becomes a QArray with its codes packed
    in uint32 words (along the contraction axis K for Dense-like layers, else the longest axis,
    :func:`qjax.serving.pack_axis`) and its scales, exactly the codes and scales that QAT used. ``args``
    are sample inputs (shapes only matter). Learned weight scales are folded into the QArrays; learned
    *input* scales stay in the ``quant`` collection (the frozen model still quantizes its inputs)."""
    hparams = qat.check_hparams(hparams)
    table = qmodel.table(variables, *args, **kwargs)
    quant = variables.get("quant", {})
    params = variables["params"]
    for entry in table.values():
        for name in entry.weights:
            where = (*entry.path, name)
            w = get_path(params, where)
            if isinstance(w, QArray):
                continue
            q = entry.rule.weight
            qa = quantize(q, w, scale=get_path(quant, where), **qat.surrogate_kwargs(q, hparams))
            params = set_path(params, where, pack_for_serving(qa, entry.contract))
    return serving_variables(variables, params)


def quantize_model(model: nn.Module, rules, *, warn_unused: bool = True) -> QuantizedModel:
    """Wrap a Linen model so that ``init``/``apply`` quantize it by ``rules`` (module docstring)."""
    return QuantizedModel(model, rules, warn_unused=warn_unused)
