"""The op-level quantization core: one quantized contraction shared by the Linen and NNX front ends.

A front end (:mod:`qjax.linen`, :mod:`qjax.nnx`) knows how a module call is intercepted and where its
variables live. For each call of a module a rule matched, it builds a :class:`Call` (the module's
:class:`ModuleEntry`, the weights the module holds, scales, hyperparameters and :class:`Settings`) and runs
the module's own code inside :func:`qjax.interception.intercepting` with :meth:`Call.handle` as handler.
Every contraction the module then calls (``einsum``, ``dot_general``, ``conv_general_dilated``, ``dot``,
``matmul``, ``tensordot``) arrives here, and the core

1. finds the weight operand: the operand that *is* (object identity) a weight the module holds; the other
   operands are its inputs. A contraction with no weight operand is activation x activation (attention's
   ``q k^T``, ``p v``) and is quantized with the rule's ``activations`` quantizer (for the fused
   ``jax.nn.dot_product_attention``, its query, key and value: ``p`` stays inside the op);
2. picks the path (:func:`execution_path`): the fused QAT op with an int8 or a float product
   (:func:`qjax.int_matmul.qat_matmul`), fake-quant operands, the packed matmul of a frozen weight
   (:func:`qjax.serving.frozen_matmul`) or its dequantized value;
3. runs it and returns what the original op would have returned (dtype included).

Which module is eligible is decided by what it does: :func:`qjax.discovery.contracted_leaves` finds the
parameters that reach a contraction, whatever op or operator (``@`` included) the model's code uses.
A weight contracted by ``x @ w`` never reaches an interceptable function (``@`` calls jnp.matmul's
compiled dispatch); the front ends then quantize the weight where it is stored and the input at the
module's call (path ``fake-quant float (at the module)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from qjax import qat
from qjax.input_transform import transform_input
from qjax.int_matmul import RESIDUALS, integer_eligible, qat_matmul
from qjax.machine import PRODUCTS, resolve_product
from qjax.qarray import QArray
from qjax.quantizer import Quantizer, quantize
from qjax.rules import Rule
from qjax.serving import frozen_int_matmul, frozen_matmul, integer_input, pack_for_serving, packed_layout

FLOAT, FAKE_QUANT, AT_MODULE, INT8, FUSED_FLOAT, PACKED, PACKED_INT, DEQUANTIZED = (
    "float", "fake-quant float", "fake-quant float (at the module)", "int8 dot_general",
    "fused fake-quant float", "packed matmul", "packed integer matmul", "dequantized float")
FUSED_PATHS = (INT8, FUSED_FLOAT)  # one custom-VJP op for the quantized contraction (qjax.int_matmul)
FROZEN_PATHS = (PACKED, PACKED_INT)  # a frozen (K, N) weight on a packed kernel (qjax.serving)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static execution settings of a quantized model: hashable, part of what jit compiles.

    Attributes:
      product: the fused QAT matmul's product: ``"auto"`` (int8 where the machine multiplies int8 faster,
        :func:`int8_product_is_faster`; else float), ``"int8"`` or ``"float"``.
      backend: the packed-matmul backend for frozen weights (:func:`kernels_pallas.packed_matmul`):
        ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.
      residuals: the operands of the fused QAT matmul's backward products (:func:`qjax.qat_matmul`):
        ``"quantized"`` (the exact gradient of the fake-quant product) or ``"original"`` (the unquantized
        operands, as Qwix's ``QtProvider``); the other paths always take the exact gradient.
    """

    product: str = "auto"
    backend: str = "auto"
    residuals: str = "quantized"

    def __post_init__(self):
        from kernels_pallas import BACKENDS

        if self.product not in PRODUCTS:
            raise ValueError(f"unknown QAT product {self.product!r}; allowed: {', '.join(PRODUCTS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if self.residuals not in RESIDUALS:
            raise ValueError(f"unknown QAT residuals {self.residuals!r}; allowed: {', '.join(RESIDUALS)}")


@dataclasses.dataclass(frozen=True)
class Use:
    """How a module contracts one of its weights, seen by the record pass: the op, the weight's operand
    position, and how many of its *leading* axes a ``dot_general`` or an ``einsum`` contracts against the
    other operand's trailing ones (``(*K, *features)`` weights: Dense, DenseGeneral, Linear, Tunix's Einsum;
    0 for any other layout)."""

    op: str
    position: int
    contract: int


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    """One module of a model: path, class name, own array parameters, which of them reach a contraction
    (``contracted``), how its ops use them (``uses``, when interceptable), leading stacked axes of its
    parameters (``stacked``: layers made by ``vmap`` and run by ``scan``) and the rule it got."""

    path: tuple[str, ...]
    type_name: str
    params: tuple[str, ...]
    contracted: tuple[str, ...] = ()
    uses: tuple[tuple[str, Use], ...] = ()
    stacked: int = 0
    rule: Rule | None = None

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def weights(self) -> tuple[str, ...]:
        """The parameters its rule quantizes: contracted ones named in ``rule.weight_names``."""
        if self.rule is None or self.rule.weight is None:
            return ()
        return tuple(p for p in self.contracted if p in self.rule.weight_names)

    def use(self, name: str) -> Use | None:
        return dict(self.uses).get(name)

    @property
    def intercepted(self) -> bool:
        """Whether every weight is contracted by an op the core sees (else it is quantized at the module)."""
        return all(self.use(n) is not None for n in self.weights)

    @property
    def contract(self) -> int:
        """Leading contraction axes of its first weight (1 for Dense; 0 when not a ``(*K, *N)`` contraction:
        a ``dot_general`` or an ``einsum`` of that form, :func:`einsum_contract`)."""
        use = self.use(self.weights[0]) if self.weights else None
        return use.contract if use is not None and use.op in ("dot_general", "einsum") else 0


def execution_path(entry: ModuleEntry | None, hparams: Mapping, settings: Settings,
                   frozen: QArray | None = None, w_ndim: int | None = None) -> str:
    """How a module's weight contraction runs: ``float`` (no weight quantizer), ``int8 dot_general`` or
    ``fused fake-quant float`` (one custom-VJP op, :func:`qjax.int_matmul.qat_matmul`, product from
    ``settings``), ``fake-quant float``, ``fake-quant float (at the module)`` (a weight no interceptable op
    contracts, e.g. ``x @ w``), ``packed matmul``, ``packed integer matmul`` (its input quantized to integer
    codes too, :func:`qjax.serving.integer_input`) or ``dequantized float`` (frozen ``frozen``)."""
    if entry is None or not entry.weights:
        return FLOAT
    use = entry.use(entry.weights[0])
    if frozen is not None:
        packed = use is not None and use.op == "dot_general" and use.contract == 1
        if not packed or packed_layout(frozen) is None:
            return DEQUANTIZED
        integer_weight = frozen.fmt.kind != "float"  # FP4 weights: the float weight-only kernel
        return PACKED_INT if integer_weight and integer_input(entry.rule.input, hparams) else PACKED
    if not entry.intercepted:
        return AT_MODULE
    rule = entry.rule
    if (use.op == "dot_general" and use.position == 1 and use.contract and len(entry.weights) == 1
            and integer_eligible(rule.weight, rule.input, dict(hparams), w_ndim or use.contract + 1,
                                 use.contract)):
        return INT8 if resolve_product(settings.product) == "int8" else FUSED_FLOAT
    return FAKE_QUANT


@dataclasses.dataclass
class Weight:
    """A weight as one module call holds it: ``seen`` is the object the module's code reads (the identity
    the core looks for), ``raw`` the float value to quantize (and differentiate), ``frozen`` its QArray
    once frozen; ``scale`` a learned scale or ``None``."""

    name: str
    raw: Any
    seen: Any
    scale: Any = None
    frozen: QArray | None = None


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def operand_positions(op: str, args: tuple) -> tuple[int, ...]:
    """Positions of the array operands of a contraction call."""
    if op == "einsum":
        return tuple(i for i in range(1, len(args)) if _is_array(args[i]))
    if op == "dot_product_attention":  # query, key, value
        return tuple(i for i in (0, 1, 2) if i < len(args) and _is_array(args[i]))
    return tuple(i for i in (0, 1) if i < len(args) and _is_array(args[i]))


def dot_contract(lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> int:
    """``c`` when a ``dot_general`` contracts the rhs's leading ``c`` axes, in order, against the lhs's
    trailing ``c`` axes with no batch axes (``x (..., *K) . w (*K, *N)``); else 0."""
    (lc, rc), (lb, rb) = dimension_numbers
    c = len(rc)
    if lb or rb or not 1 <= c < rhs_ndim:
        return 0
    if tuple(rc) != tuple(range(c)) or tuple(lc) != tuple(range(lhs_ndim - c, lhs_ndim)):
        return 0
    return c


def einsum_contract(subscripts, position: int, n_operands: int) -> int:
    """``c`` when an ``einsum`` with the weight at operand ``position`` (1 or 2; 0 is the subscripts) is a
    Dense-like ``x (..., *K) . w (*K, *F) -> (..., *F)``: the weight's first ``c`` labels are the other
    operand's last ``c``, in order, they are the contracted labels, no other label is shared and the output
    is the other operand's leading labels then the weight's remaining ones (Tunix's ``BTD,DNH->BTNH`` and
    ``BTNH,NHD->BTD``: 1 and 2); else 0."""
    if not isinstance(subscripts, str) or n_operands != 2 or "..." in subscripts or "->" not in subscripts:
        return 0
    inputs, out = subscripts.replace(" ", "").split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or position not in (1, 2):
        return 0
    w, x = parts[position - 1], parts[2 - position]
    shared = set(w) & set(x)
    c = len(shared)
    if not 1 <= c < len(w) or shared & set(out) or len(set(w)) != len(w) or len(set(x)) != len(x):
        return 0
    if w[:c] != x[len(x) - c:] or out != x[: len(x) - c] + w[c:]:
        return 0
    return c


class Call:
    """One call of a quantized module: what :meth:`handle` needs to quantize its contractions."""

    def __init__(self, entry: ModuleEntry | None, weights: Mapping[str, Weight], hparams: Mapping,
                 settings: Settings, input_scale=None, recorder: dict | None = None,
                 input_transform: Mapping | None = None):
        self.entry = entry
        self.rule = entry.rule if entry is not None else None
        self.weights = dict(weights)
        self.hparams = dict(hparams)
        self.settings = settings
        self.input_scale = input_scale
        self.input_transform = input_transform  # qjax.input_transform: applied to the contraction input
        self.recorder = recorder  # record pass: {param name: Use}
        self.trace = jex_core.get_opaque_trace_state()

    def _find_weight(self, op: str, args: tuple):
        """The weight operand: the operand that is a weight the module holds; else (a transformation such
        as ``grad`` may hand the op a fresh tracer of the same value, e.g. after a no-op cast) the operand
        at the position the record pass saw, when it has the weight's shape."""
        positions = operand_positions(op, args)
        for i in positions:
            for w in self.weights.values():
                if args[i] is w.seen:
                    return i, w
        if self.entry is None:
            return None, None
        for w in self.weights.values():
            use = self.entry.use(w.name)
            if (use is not None and use.op == op and use.position in positions
                    and jnp.shape(args[use.position]) == jnp.shape(w.seen)):
                return use.position, w
        return None, None

    def handle(self, op: str, original, args: tuple, kwargs: dict):
        """The quantized version of ``original(*args, **kwargs)`` (module docstring)."""
        position, weight = self._find_weight(op, args)
        contract = (dot_contract(jnp.ndim(args[0]), jnp.ndim(args[1]), args[2])
                    if weight is not None and op == "dot_general" and position == 1 else 0)
        if self.recorder is not None:
            if weight is not None:
                if op == "einsum":
                    contract = einsum_contract(args[0], position, len(operand_positions(op, args)))
                self.recorder.setdefault(weight.name, Use(op, position, contract))
            return original(*args, **kwargs)
        rule = self.rule
        if weight is None or rule is None or rule.weight is None or weight.name not in self.entry.weights:
            if (weight is None and rule is not None and rule.activations is not None
                    and jex_core.get_opaque_trace_state() == self.trace):
                args = tuple(qat.quantize_input(rule.activations, a, None, self.hparams)
                             if i in operand_positions(op, args) else a for i, a in enumerate(args))
            return original(*args, **kwargs)
        path = execution_path(self.entry, self.hparams, self.settings, weight.frozen,
                              None if weight.raw is None else jnp.ndim(weight.raw))
        if path in (*FROZEN_PATHS, *FUSED_PATHS) and contract == (1 if path in FROZEN_PATHS
                                                                 else self.entry.contract):
            return self._fused(path, args, kwargs, weight, contract)
        args = list(args)
        if weight.frozen is None:
            value = qat.quantize_weight(rule.weight, weight.raw, weight.scale, self.hparams)
            args[position] = value.astype(jnp.result_type(args[position]))
        else:
            args[position] = weight.seen
        for i in operand_positions(op, tuple(args)):
            if i != position:
                args[i] = transform_input(self.input_transform, args[i], self.settings.backend)
                if rule.input is not None:
                    args[i] = qat.quantize_input(rule.input, args[i], self.input_scale, self.hparams)
        return original(*args, **kwargs)

    def _fused(self, path: str, args, kwargs, weight: Weight, contract: int):
        """``x . w`` as one op: the packed (integer) matmul of a frozen weight, or the fused QAT matmul."""
        x, w = args[0], args[1]
        dtype = kwargs.get("preferred_element_type") or (args[5] if len(args) > 5 else None) \
            or jnp.result_type(x, w)
        x = transform_input(self.input_transform, x, self.settings.backend)
        rule = self.rule
        if path == PACKED_INT and jnp.issubdtype(x.dtype, jnp.floating):
            y = frozen_int_matmul(x, weight.frozen, rule.input, self.input_scale, self.hparams,
                                  self.settings.backend)
            return y.astype(dtype)
        if path in FROZEN_PATHS:
            if rule.input is not None:
                x = qat.quantize_input(rule.input, x, self.input_scale, self.hparams)
            return frozen_matmul(x, weight.frozen, self.settings.backend).astype(dtype)
        product = "int8" if path == INT8 else "float"
        y = qat_matmul(x, weight.raw, rule.weight, rule.input, self.input_scale, weight.scale, self.hparams,
                       contract, product, self.settings.residuals)
        return y.astype(dtype)


@dataclasses.dataclass
class Record:
    """What the record pass saw of one module: its class name, own array parameters, their shapes as the
    module held them (a stacked layer's slice inside ``scan``), how its ops used them, and its first input."""

    type_name: str
    params: tuple[str, ...]
    shapes: dict = dataclasses.field(default_factory=dict)
    uses: dict = dataclasses.field(default_factory=dict)
    inputs: Any = None

    def observe(self, own: Mapping[str, Any], args: tuple) -> Call:
        """Note one call's parameter shapes and first input; the recording :class:`Call` to run it under."""
        self.shapes.update({k: jnp.shape(v) for k, v in own.items()})
        if self.inputs is None and args and hasattr(args[0], "dtype"):
            self.inputs = args[0]
        return Call(None, {k: Weight(k, v, v) for k, v in own.items()}, {}, Settings(), recorder=self.uses)

    def entry(self, path: tuple[str, ...], contracted: set[str], stored: Mapping[str, tuple]) -> ModuleEntry:
        """The module's :class:`ModuleEntry` (rule unset), given the names of its parameters that reach a
        contraction (:mod:`qjax.discovery`) and their stored shapes: leading axes the module never sees are
        stacked layers. A weight the core saw contracted but that is no leaf of the model's own variables
        (a nested ``.apply``'s) counts as contracted too."""
        hit = set(contracted) or set(self.uses)
        stacked = max((len(stored[p]) - len(self.shapes[p]) for p in hit if p in stored and p in self.shapes),
                      default=0)
        return ModuleEntry(path, self.type_name, self.params, tuple(p for p in self.params if p in hit),
                           tuple(sorted(self.uses.items())), max(stacked, 0))


def quantize_at_module(entry: ModuleEntry, args: tuple, input_scale, hparams: Mapping,
                       input_transform: Mapping | None = None) -> tuple:
    """The call's arguments with its first input transformed (:mod:`qjax.input_transform`) and quantized by
    the rule's ``input`` quantizer when no interceptable op contracts the module's weight (path
    ``fake-quant float (at the module)``)."""
    if entry.intercepted or not args or (entry.rule.input is None and input_transform is None):
        return args
    x = transform_input(input_transform, args[0])
    if entry.rule.input is not None:
        x = qat.quantize_input(entry.rule.input, x, input_scale, dict(hparams))
    return (x, *args[1:])


def frozen_weight(q: Quantizer, w: jax.Array, scale, hparams: Mapping, contract: int, stacked: int) -> QArray:
    """The serving QArray of a trained weight: exactly QAT's codes and scales, packed as
    :func:`qjax.serving.pack_for_serving` packs (one set per stacked layer). Jitted: one fused program, so
    freezing holds no full-size temporaries beside the model."""
    def one(v, s):
        return pack_for_serving(quantize(q, v, scale=s, **qat.surrogate_kwargs(q, dict(hparams))), contract)

    return jax.jit(stacked_map(one, stacked))(w, scale)


def stacked_map(fn, stacked: int):
    """``fn`` mapped over ``stacked`` leading axes (per-layer scales of ``vmap``-stacked layers)."""
    for _ in range(stacked):
        fn = jax.vmap(fn)
    return fn


def initial_weight_scale(q: Quantizer, w: jax.Array, stacked: int = 0) -> jax.Array:
    """A learned weight scale's start (:func:`qjax.qat.initial_scale`), one per stacked layer."""
    return stacked_map(lambda v: qat.initial_scale(q, v), stacked)(w)
