"""PTQ's one functional view of a Linen or an NNX model: every PTQ method is written once over it.

:func:`model_view` gives each method the same five things, whatever the front end:

1. ``table`` and ``layers``: the front end's own table of modules and rules
   (:meth:`qjax.linen.QuantizedModel.table`, :func:`qjax.nnx.module_table`) and the quantized weights in
   it (:class:`~qjax.ptq.layers.Layer`: path, quantizer, contraction axes, stacked axes);
2. ``params`` (a params tree of the *float* weights, frozen ones dequantized) and ``rest`` (every other
   variable), and ``apply(params, rest, batch)``: the float model run with those values, a pure function
   (jit, grad). Contraction inputs are captured through it (:mod:`qjax.ptq.capture`);
3. ``frozen_start``: the QArrays of weights that were frozen already (a method may start from them);
4. ``frozen(qarrays, params)``: the result with each quantized weight replaced by its packed QArray;
5. ``student()``: the model quantized by the rules (fake-quant forward, STE backward) as a pure function
   of its params, and how to freeze trained params (:func:`qjax.ptq.ste_finetune`).

Linen: ``model`` is a ``flax.linen.Module`` (or a :class:`~qjax.linen.QuantizedModel`) and ``variables`` its
variables; ``params`` is ``variables["params"]`` (partitioning boxes kept). The result is a new dict of
frozen variables (:func:`qjax.ptq.layers.frozen_variables`); ``variables`` is not changed.

NNX: ``model`` is an ``nnx.Module`` and ``variables`` must be ``None`` (the module holds its variables);
``params`` is its ``nnx.Param`` state as a pure dict. The model may be float, quantized by
:func:`qjax.nnx.quantize_model`, or frozen (by :func:`qjax.nnx.freeze` or a PTQ method): the view runs a
float copy made by ``nnx.merge(*nnx.split(model))`` (the same arrays, no second copy of the weights) with
qjax's classes taken off and frozen weights dequantized, and it does not touch ``model`` until the result:
``frozen`` quantizes ``model`` in place by the rules (:func:`qjax.nnx.quantize_model`, afresh if it was
quantized, keeping its calibrated or learned input scales) and makes each quantized weight a
:class:`qjax.nnx.PackedWeight` holding the QArray the method found; the model then runs its frozen
(packed-matmul) path. The example input of that quantization is the first calibration batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
from flax import nnx

from qjax import linen as ql
from qjax import nnx as qn
from qjax.ptq.layers import Layer, Path, frozen_variables, get_path, packed
from qjax.qarray import QArray
from qjax.rules import check_rules

Apply = Callable[[dict, object, Mapping], object]  # (params, rest, batch) -> model outputs


def model_view(model, variables: Mapping | None, rules, batch: Mapping, apply_kwargs: Mapping | None,
               who: str) -> LinenView | NnxView:
    """The view of ``model`` (module docstring); ``batch`` is an example input (shapes only), ``who`` the
    calling method's name for error messages."""
    apply_kwargs = dict(apply_kwargs or {})
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(f"{who}: an NNX model holds its own variables; pass variables=None "
                             f"(e.g. {who}(model, None, rules, batches)), got {type(variables).__name__}")
        return NnxView(model, rules, batch, apply_kwargs, who)
    if isinstance(model, nn.Module | ql.QuantizedModel):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(f"{who}: a Linen model needs its variables (a dict with 'params'), got "
                             f"{type(variables).__name__}")
        return LinenView(model, variables, rules, batch, apply_kwargs, who)
    raise ValueError(f"{who}: expected a flax.linen Module, a qjax.linen.QuantizedModel or an nnx.Module, "
                     f"got {type(model).__name__}")


class _View:
    """What both views share: the layers from the table, and the frozen weights to start from."""

    rules: tuple
    who: str

    table: dict  # module path -> ModuleEntry; each view sets it

    @functools.cached_property
    def layers(self) -> list[Layer]:
        """The weights the rules quantize, in the order the model calls their modules; ``ValueError`` when
        none matches (PTQ of nothing is a mistake, not a no-op)."""
        table = self.table
        layers = [Layer((*entry.path, name), entry.rule.weight, entry.contract, entry.stacked)
                  for entry in table.values() for name in entry.weights]
        if not layers:
            raise ValueError(f"no weight matched a rule with a weight quantizer; rules: "
                             f"{[r.label for r in self.rules]}; modules: {sorted(table)[:20]}")
        return layers

    def teacher(self, teacher) -> _View:
        """The float teacher's view: this model's when ``teacher`` is ``None``; else Linen: the same
        module with the variables ``teacher``; NNX: the float ``nnx.Module`` ``teacher``."""
        if teacher is None:
            return self
        model, variables = (self.qmodel, teacher) if self.front_end == "linen" else (teacher, None)
        return model_view(model, variables, (), self.batch, self.apply_kwargs, f"{self.who} (teacher)")

    def entry(self, module: Path):
        """The table's entry of the module at ``module``; ``ValueError`` naming the known ones."""
        entry = self.table.get("/".join(module))
        if entry is None:
            raise ValueError(f"{self.who}: no module {'/'.join(module)!r} in the model; modules: "
                             f"{sorted(self.table)[:20]}")
        return entry


class LinenView(_View):
    """A Linen model and its variables (module docstring)."""

    front_end = "linen"

    def __init__(self, model, variables: Mapping, rules, batch: Mapping, apply_kwargs: dict, who: str):
        if not isinstance(model, ql.QuantizedModel):
            model = ql.quantize_model(model, rules if rules is not None else ())
        self.qmodel = model
        self.rules, self.who = self.qmodel.rules, who
        self.variables = dict(variables)
        self.batch, self.apply_kwargs = dict(batch), apply_kwargs
        start = ql.float_view(self.variables)
        self.params = start["params"]
        self.rest = {k: v for k, v in start.items() if k not in ("params", "quant")}
        self._start = start
        _refuse_transformed([m for m, _ in _transforms_in(self.variables.get("quant", {}))], who)

    @functools.cached_property
    def table(self) -> dict:
        return self.qmodel.table(self._start, **self.batch, **self.apply_kwargs)

    def apply(self, params, rest, batch):
        return self.qmodel.model.apply({**rest, "params": params}, **batch, **self.apply_kwargs)

    @functools.cached_property
    def frozen_start(self) -> dict[Path, QArray]:
        out = {}
        for layer in self.layers:
            w = ql.unbox(get_path(self.variables["params"], layer.path))
            if isinstance(w, QArray):
                out[layer.path] = w
        return out

    def frozen(self, qarrays: Mapping[Path, QArray], params: Mapping | None = None,
               transforms: Mapping[Path, Mapping] | None = None) -> dict:
        """Frozen variables (:func:`~qjax.ptq.layers.frozen_variables`); ``params``: new values of the
        other parameters (default: the variables' own); ``transforms``: ``{module path: input transform}``
        (:mod:`qjax.input_transform`), stored in ``variables["quant"]``."""
        variables = self.variables if params is None else {**self.variables, "params": params}
        out = frozen_variables(variables, self.layers, qarrays)
        if transforms:
            quant = dict(out.get("quant", {}))
            for module, transform in transforms.items():
                quant = ql.set_path(quant, (*module, ql.TRANSFORM_KEY), dict(transform))
            out["quant"] = quant
        return out

    def student(self) -> tuple[dict, object, Apply, Callable[[dict], dict]]:
        """``(params, rest, apply, finish)``: ``apply`` runs ``quantize_model(model, rules).apply``;
        ``finish(params)`` is :func:`qjax.linen.freeze` of the trained params."""
        rest = {k: v for k, v in self._start.items() if k != "params"}

        def apply(params, rest, batch):
            return self.qmodel.apply({**rest, "params": params}, **batch, **self.apply_kwargs)

        def finish(params):
            return ql.freeze(self.qmodel, {**rest, "params": params}, **self.batch, **self.apply_kwargs)

        return self.params, rest, apply, finish

    def with_input_scales(self, scales: Mapping[Path, jax.Array]) -> dict:
        """The variables with each module's input scale in ``variables["quant"]``."""
        quant = dict(self.variables.get("quant", {}))
        for module, scale in scales.items():
            quant = ql.set_path(quant, (*module, ql.INPUT_KEY), scale)
        return {**self.variables, "quant": quant}


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    return {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}


def _is_quantized(model: nnx.Module) -> bool:
    return isinstance(getattr(model, qn.HPARAMS, None), qn.Hyperparams)


def _weight_scale_name(param: str) -> str:
    return f"{param}_qscale"  # where qjax.nnx keeps a learned weight scale (folded in by a freeze)


class NnxView(_View):
    """An NNX model (module docstring)."""

    front_end = "nnx"

    def __init__(self, model: nnx.Module, rules, batch: Mapping, apply_kwargs: dict, who: str):
        self.model, self.rules, self.who = model, check_rules(rules if rules is not None else ()), who
        self.batch, self.apply_kwargs = dict(batch), apply_kwargs
        copy = nnx.merge(*nnx.split(model))  # new module objects over the same variables and arrays
        self.frozen_start: dict[Path, QArray] = {}
        self.input_scales: dict[str, jax.Array] = {}
        for name, module in _modules(copy).items():
            prefix = tuple(name.split("/")) if name else ()
            for attr, var in list(vars(module).items()):
                if isinstance(var, qn.PackedWeight):
                    self.frozen_start[(*prefix, attr)] = var.qarray
                    setattr(module, attr, nnx.Param(var.get_value(), **var.get_metadata()))
            scale = getattr(module, qn.INPUT_SCALE, None)
            if isinstance(scale, nnx.Variable):
                self.input_scales[name] = scale.get_value()
            if isinstance(getattr(module, qn.INPUT_TRANSFORM, None), qn.InputTransform):
                _refuse_transformed([name], who)
        if _is_quantized(copy):
            qn.unquantize_model(copy)  # the copy's classes and scales only; model keeps its own
        self._copy = copy
        self.graphdef, param_state, self.rest = nnx.split(copy, nnx.Param, ...)
        self.params = nnx.to_pure_dict(param_state)

    @functools.cached_property
    def table(self) -> dict:
        return qn.module_table(self._copy, self.rules, **self.batch, **self.apply_kwargs)

    def apply(self, params, rest, batch):
        return nnx.merge(self.graphdef, params, rest)(**batch, **self.apply_kwargs)

    def _quantize_in_place(self, params: Mapping) -> dict[str, nnx.Module]:
        """``model`` with its Params set to ``params`` and quantized afresh by the rules, in place, its input
        scales kept; returns its modules by path."""
        model = self.model
        for name, module in _modules(model).items():
            prefix = tuple(name.split("/")) if name else ()
            for attr, var in list(vars(module).items()):
                if isinstance(var, qn.PackedWeight):  # back to a Param, so the model can be re-quantized
                    value = get_path(params, (*prefix, attr))
                    setattr(module, attr, nnx.Param(var.get_value() if value is None else value,
                                                    **var.get_metadata()))
        nnx.update(model, params)
        if _is_quantized(model):
            qn.unquantize_model(model)
        qn.quantize_model(model, self.rules, **self.batch, **self.apply_kwargs)
        modules = _modules(model)
        table = qn.module_table(model, self.rules)
        for name, value in self.input_scales.items():
            entry = table.get(name)
            q = entry.rule.input if entry is not None and entry.rule is not None else None
            if q is not None and q.scale in ("given", "learned"):
                _set_input_scale(modules[name], value)
        return modules

    def frozen(self, qarrays: Mapping[Path, QArray], params: Mapping | None = None,
               transforms: Mapping[Path, Mapping] | None = None) -> nnx.Module:
        """``model``, quantized by the rules and frozen in place with ``qarrays`` (module docstring);
        ``params``: new values of the other parameters (default: the model's own); ``transforms``:
        ``{module path: input transform}`` (a :class:`qjax.nnx.InputTransform` on the module)."""
        modules = self._quantize_in_place(self.params if params is None else params)
        for module, transform in (transforms or {}).items():
            setattr(modules["/".join(module)], qn.INPUT_TRANSFORM, qn.InputTransform(dict(transform)))
        for layer in self.layers:
            module, attr = modules["/".join(layer.module)], layer.path[-1]
            var = getattr(module, attr)
            setattr(module, attr, qn.PackedWeight(packed(layer, qarrays[layer.path]), **var.get_metadata()))
            if isinstance(getattr(module, _weight_scale_name(attr), None), qn.QuantScale):
                delattr(module, _weight_scale_name(attr))
        return self.model

    def student(self) -> tuple[dict, object, Apply, Callable[[dict], nnx.Module]]:
        """``(params, rest, apply, finish)``: ``model`` quantized in place by the rules (from the float
        params), ``apply`` running it as a pure function of its Params; ``finish(params)`` writes trained
        params into it and freezes it (:func:`qjax.nnx.freeze`)."""
        self._quantize_in_place(self.params)
        graphdef, param_state, rest = nnx.split(self.model, nnx.Param, ...)

        def apply(params, rest, batch):
            return nnx.merge(graphdef, params, rest)(**batch, **self.apply_kwargs)

        def finish(params):
            nnx.update(self.model, params)
            qn.freeze(self.model)
            return self.model

        return nnx.to_pure_dict(param_state), rest, apply, finish

    def with_input_scales(self, scales: Mapping[Path, jax.Array]) -> nnx.Module:
        """``model`` (quantized in place by the rules first, unless it is quantized already) with each
        module's input scale set (a :class:`qjax.nnx.QuantScale` ``input_qscale``)."""
        if not _is_quantized(self.model):
            qn.quantize_model(self.model, self.rules, **self.batch, **self.apply_kwargs)
        modules = _modules(self.model)
        for module, scale in scales.items():
            _set_input_scale(modules["/".join(module)], scale)
        return self.model


def _transforms_in(quant: Mapping, prefix: Path = ()):
    """``(module path, transform)`` of every input transform in a Linen ``quant`` collection."""
    for key, value in quant.items():
        if key == ql.TRANSFORM_KEY:
            yield "/".join(prefix), value
        elif isinstance(value, Mapping):
            yield from _transforms_in(value, (*prefix, key))


def _refuse_transformed(modules: list[str], who: str) -> None:
    """A model whose weights hold ``diag(s) W`` (SmoothQuant, AWQ) has no float view to start a method
    from: its float weights are not stored."""
    if modules:
        raise ValueError(f"{who}: modules {sorted(modules)[:5]} carry input transforms (SmoothQuant / AWQ): "
                         "their stored weights are diag(s) W, not the float model's; allowed: start from "
                         "the float model")


def _set_input_scale(module: nnx.Module, value: jax.Array) -> None:
    var = getattr(module, qn.INPUT_SCALE, None)
    if isinstance(var, nnx.Variable):
        var.set_value(value)
    else:
        setattr(module, qn.INPUT_SCALE, qn.QuantScale(value))

