"""Quantize a Flax NNX model by rules, in place, without cloning it.

NNX has no method interception, so ``quantize_model(model, rules)`` gives each matched module a
quantizing version of the operation it already injects (the model's code is not edited and its parameter
buffers are neither copied nor replaced):

=======================================  ===========================  ===============================
module                                   attribute replaced           quantized operands
=======================================  ===========================  ===============================
``nnx.Linear``, ``nnx.LinearGeneral``    ``dot_general``              input (lhs), kernel (rhs)
``nnx.Conv``, ``nnx.ConvTranspose``      ``conv_general_dilated``     input (lhs), kernel (rhs)
``nnx.Einsum``                           ``einsum_op``                input, kernel
``nnx.MultiHeadAttention``               ``attention_fn``             query, key, value (activations)
=======================================  ===========================  ===============================

The injected :class:`QuantizedOp` is itself an ``nnx.Module``: learned scales are :class:`QuantScale`
variables inside it, and every op shares one :class:`Hyperparams` module whose variables (``o``, ``omega``,
``enabled``, ...; see :mod:`qjax.qat`) are traced under ``nnx.jit``, so a schedule never recompiles.
A learned *input* scale is created by the module's first call, from that batch (LSQ's data-dependent
start): run one forward pass before building the optimizer, so that ``nnx.Optimizer`` sees it.
``unquantize_model`` restores the original operations. ``freeze(model)`` replaces each quantized weight by a
:class:`PackedWeight` (packed QArray codes + scales); Linear and LinearGeneral layers then run on the packed
matmul. Learned scales train with ``nnx.grad(..., argnums=nnx.DiffState(0, (nnx.Param, QuantScale)))``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qjax import qat
from qjax.qarray import QArray, dequantize
from qjax.quantizer import Quantizer, quantize
from qjax.rules import Rule, check_rules, format_table
from qjax.serving import frozen_matmul, pack_for_serving, packed_layout

OP_ATTRIBUTES: dict[str, str] = {
    "Linear": "dot_general",
    "LinearGeneral": "dot_general",
    "Conv": "conv_general_dilated",
    "ConvTranspose": "conv_general_dilated",
    "Einsum": "einsum_op",
    "MultiHeadAttention": "attention_fn",
}


_DEFAULT_OPS: dict[str, Callable[[], Callable]] = {  # what a module uses when its attribute is None
    "dot_general": lambda: jax.lax.dot_general,
    "conv_general_dilated": lambda: jax.lax.conv_general_dilated,
    "einsum_op": lambda: jnp.einsum,
    "attention_fn": lambda: nnx.dot_product_attention,
}


class PackedWeight(nnx.Variable):
    """A frozen weight stored as a packed :class:`~qjax.QArray`; reading it (``w[...]``, ``get_value``)
    gives the dequantized array, so a module that reads its kernel works unchanged."""

    def get_value(self, *, index=None):
        value = dequantize(self.get_raw_value())
        return value if index is None or index is Ellipsis else value[index]

    @property
    def qarray(self) -> QArray:
        return self.get_raw_value()


class QuantScale(nnx.Variable):
    """A learned quantization scale (LSQ step, BiPer/XNOR alpha)."""


class Hyperparameter(nnx.Variable):
    """A per-step QAT hyperparameter (a float32 scalar)."""


class Hyperparams(nnx.Module):
    """The shared per-step hyperparameters of a quantized model; set them with :meth:`set`."""

    def __init__(self, **values: float):
        qat.check_hparams(values)
        for name, value in values.items():
            setattr(self, name, Hyperparameter(jnp.asarray(value, jnp.float32)))

    def set(self, **values) -> None:
        qat.check_hparams(values)
        for name, value in values.items():
            if not hasattr(self, name):
                raise ValueError(f"hyperparameter {name!r} was not declared; declared: {self.as_dict()}; "
                                 "pass it to quantize_model(..., hparams=...)")
            getattr(self, name).set_value(jnp.asarray(value, jnp.float32))

    def as_dict(self) -> dict[str, jax.Array]:
        return {k: v.get_value() for k, v in vars(self).items() if isinstance(v, Hyperparameter)}


class QuantizedOp(nnx.Module):
    """A module's contraction (``dot_general``, conv, einsum or attention) with quantized operands."""

    def __init__(self, original: Callable | None, type_name: str, rule: Rule, hparams: Hyperparams,
                 weight: jax.Array | None):
        self.original = original
        self.op = original if original is not None else _DEFAULT_OPS[OP_ATTRIBUTES[type_name]]()
        self.type_name = type_name
        self.rule = rule
        self.hparams = hparams
        learned = qat.needs_state(rule.weight) and weight is not None
        self.weight_scale = nnx.data(QuantScale(qat.initial_scale(rule.weight, weight)) if learned else None)
        self.input_scale = nnx.data(None)
        self.frozen = nnx.data(None)  # the module's PackedWeight once frozen

    def _scale(self, variable):
        return None if variable is None else variable.get_value()

    def _input(self, q: Quantizer | None, x, hp):
        if q is None:
            return x
        if q is self.rule.input and qat.needs_state(q) and self.input_scale is None:
            # LSQ's data-dependent start, from the first batch this module sees (``2 mean|x| / sqrt(fmax)``)
            self.input_scale = QuantScale(qat.initial_scale(q, jax.lax.stop_gradient(x)))
        return qat.quantize_input(q, x, self._scale(self.input_scale), hp)

    def _weight(self, w, hp):
        if self.rule.weight is None:
            return w
        return qat.quantize_weight(self.rule.weight, w, self._scale(self.weight_scale), hp)

    def _frozen_call(self, x, w, dims, **kwargs):
        contracting, batch = dims
        single = contracting == ((x.ndim - 1,), (0,)) and batch == ((), ())
        if self.type_name in ("Linear", "LinearGeneral") and single and packed_layout(self.frozen.qarray):
            dtype = kwargs.get("preferred_element_type") or x.dtype
            return frozen_matmul(x, self.frozen.qarray).astype(dtype)
        return self.op(x, w, dims, **kwargs)

    def __call__(self, *args, **kwargs):
        hp = self.hparams.as_dict()
        if self.frozen is not None and self.type_name not in ("Einsum", "MultiHeadAttention"):
            x, w, dims, *rest = args
            kwargs = {k: v for k, v in kwargs.items() if k != "out_sharding" or v is not None}
            x = self._input(self.rule.input, x, hp)
            if self.type_name in ("Linear", "LinearGeneral"):
                return self._frozen_call(x, w, dims, *rest, **kwargs)
            return self.op(x, w, dims, *rest, **kwargs)
        if self.frozen is not None and self.type_name == "Einsum":
            subscripts, x, w, *rest = args
            return self.op(subscripts, self._input(self.rule.input, x, hp), w, *rest, **kwargs)
        if self.type_name == "MultiHeadAttention":
            q = self.rule.activations
            args = tuple(self._input(q, a, hp) if i < 3 else a for i, a in enumerate(args))
            return self.op(*args, **kwargs)
        if self.type_name == "Einsum":
            subscripts, x, w, *rest = args
            return self.op(subscripts, self._input(self.rule.input, x, hp), self._weight(w, hp), *rest,
                           **kwargs)
        x, w, *rest = args
        return self.op(self._input(self.rule.input, x, hp), self._weight(w, hp), *rest, **kwargs)


def _module_weight(module: nnx.Module, names: tuple[str, ...]):
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, nnx.Param):
            return value.get_value()
    return None


def module_table(model: nnx.Module, rules) -> dict[str, tuple[str, Rule | None]]:
    """Module path -> (class name, matched rule) for every module that owns a weight or that a rule names."""
    rules = check_rules(rules)
    table = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, QuantizedOp | Hyperparams):
            continue
        name, type_name = "/".join(str(p) for p in path), type(module).__name__
        rule = None
        for r in rules:
            owns = _module_weight(module, r.weight_names) is not None
            if r.matches(name, type_name) and (owns or r.types):
                rule = r
                break
        if rule is not None or _module_weight(module, ("kernel",)) is not None:
            table[name] = (type_name, rule)
    return table


def dry_run(model: nnx.Module, rules) -> str:
    """The printable table of module path -> rule for ``model`` (``-`` for float)."""
    return format_table({path: rule for path, (_, rule) in module_table(model, rules).items()})


def quantize_model(model: nnx.Module, rules, *, hparams: dict | None = None,
                   warn_unused: bool = True) -> Hyperparams:
    """Quantize ``model`` in place by ``rules``; returns the shared :class:`Hyperparams` (declare each
    per-step hyperparameter you will change, e.g. ``hparams={"o": 1.0}``)."""
    if not isinstance(model, nnx.Module):
        raise ValueError(f"qjax.nnx.quantize_model expects an nnx.Module, got {type(model).__name__}")
    rules = check_rules(rules)
    shared = Hyperparams(**(hparams or {}))
    table = module_table(model, rules)
    modules = dict(("/".join(str(p) for p in path), m) for path, m in nnx.iter_modules(model))
    for name, (type_name, rule) in table.items():
        if rule is None:
            continue
        if type_name not in OP_ATTRIBUTES:
            raise ValueError(f"module {name!r} of type {type_name} matched rule {rule.label!r}, but qjax "
                             f"cannot quantize it in place; allowed types: {', '.join(OP_ATTRIBUTES)}")
        module = modules[name]
        attribute = OP_ATTRIBUTES[type_name]
        op = getattr(module, attribute)
        if isinstance(op, QuantizedOp):
            raise ValueError(f"module {name!r} is already quantized; call unquantize_model first")
        if getattr(module, "dot_general_cls", None) is not None:
            raise ValueError(f"module {name!r} sets dot_general_cls, which qjax cannot wrap; allowed: "
                             "modules that use their dot_general attribute")
        weight = _module_weight(module, rule.weight_names)
        setattr(module, attribute, nnx.data(QuantizedOp(op, type_name, rule, shared, weight)))
    if warn_unused:
        used = {id(rule) for _, rule in table.values()}
        unused = [r.label for r in rules if id(r) not in used]
        if unused:
            import warnings

            warnings.warn(f"qjax rules matched no module: {unused}; modules: {sorted(table)[:20]}",
                          stacklevel=2)
    return shared


def freeze(model: nnx.Module) -> None:
    """Turn a quantized model's trained weights into packed QArrays, in place.

    Each weight a rule quantizes becomes a :class:`PackedWeight` holding exactly the codes and scales that
    QAT used (learned scales folded in), packed in uint32 words (:func:`qjax.serving.pack_axis`); Linear
    and single-axis LinearGeneral layers with integer codes then run on :func:`kernels_pallas.packed_matmul`,
    other modules read the dequantized weight. Inputs keep their QAT quantizers.
    """
    for _, module in nnx.iter_modules(model):
        attribute = OP_ATTRIBUTES.get(type(module).__name__)
        op = getattr(module, attribute, None) if attribute else None
        if not isinstance(op, QuantizedOp) or op.rule.weight is None or op.frozen is not None:
            continue
        names = op.rule.weight_names
        name = next((n for n in names if isinstance(getattr(module, n, None), nnx.Param)), None)
        if name is None:
            continue
        q = op.rule.weight
        hp = op.hparams.as_dict()
        qa = quantize(q, getattr(module, name).get_value(), scale=op._scale(op.weight_scale),
                      **qat.surrogate_kwargs(q, hp))
        single = isinstance(module, nnx.LinearGeneral) and len(module.axis) == 1
        contract = 1 if isinstance(module, nnx.Linear) or single else 0
        packed = PackedWeight(pack_for_serving(qa, contract))
        setattr(module, name, packed)
        op.frozen = packed
        op.weight_scale = None


def unquantize_model(model: nnx.Module) -> None:
    """Undo :func:`quantize_model` in place: every :class:`QuantizedOp` gives back the original op."""
    for _, module in nnx.iter_modules(model):
        attribute = OP_ATTRIBUTES.get(type(module).__name__)
        if attribute and isinstance(getattr(module, attribute, None), QuantizedOp):
            setattr(module, attribute, nnx.static(getattr(module, attribute).original))
