"""Quantize a Flax NNX model by rules, in place, without cloning it (front end of :mod:`qjax.core`).

``hparams = quantize_model(model, rules, *example_args)`` finds, from one abstract trace of
``model(*example_args)`` (no FLOPs, :mod:`qjax.discovery`), which modules contract which of their own
parameters, assigns the rules (:func:`qjax.rules.assign`), and only then changes the model:

- every module's class is swapped for a cached subclass of the same name whose ``__call__`` (and public
  methods of the model's own classes, e.g. an embedder's ``decode``) runs the original method inside
  :func:`qjax.interception.intercepting`, with a :class:`qjax.core.Call` for a quantized module and a
  shield for a float one; the model's code is not edited and no parameter buffer is copied or replaced;
- each module remembers its :class:`~qjax.core.ModuleEntry` and :class:`~qjax.core.Settings` as a static
  attribute (part of the graph definition, so ``nnx.jit`` compiles per setting, and ``nnx.scan`` over
  ``nnx.vmap``-stacked layers carries it into the scanned copies);
- learned scales (LSQ steps, BiPer's alpha) are :class:`QuantScale` variables on the module
  (``<param>_qscale``, ``input_qscale``), created here from the weights and the example input, one per
  stacked layer;
- per-step hyperparameters live in one :class:`Hyperparams` module at the root (``model.qjax_hparams``),
  outside any scanned stack, and reach every quantized call made through the root's call.

``freeze(model)`` replaces each quantized weight by a :class:`PackedWeight` (packed QArray codes and
scales, per stacked layer), in place; ``paths(model)`` says how each quantized contraction runs;
``unquantize_model(model)`` restores the original classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from flax.errors import FlaxError

from qjax import qat
from qjax.core import (
    AT_MODULE,
    DEQUANTIZED,
    FAKE_QUANT,
    FUSED_PATHS,
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
)
from qjax.discovery import contracted_leaves
from qjax.interception import intercepting
from qjax.qarray import QArray, dequantize
from qjax.rules import assign, check_rules, format_table

__all__ = ["AT_MODULE", "DEQUANTIZED", "FAKE_QUANT", "FUSED_PATHS", "PACKED", "Hyperparameter", "Hyperparams",
           "InputTransform", "PackedWeight", "QuantScale", "dry_run", "freeze",
           "module_table", "paths", "quantize_model", "summary_params", "unquantize_model"]

CONFIG = "_qjax_config"
HPARAMS = "qjax_hparams"
INPUT_SCALE = "input_qscale"
INPUT_TRANSFORM = "input_transform"


class PackedWeight(nnx.Variable):
    """A frozen weight stored as a packed :class:`~qjax.QArray`; reading it (``w[...]``, ``get_value``)
    gives the dequantized array, so a module that reads its kernel works unchanged."""

    def get_value(self, *, index=None):
        raw = self.get_raw_value()
        value = dequantize(raw) if isinstance(raw, QArray) else raw
        return value if index is None or index is Ellipsis else value[index]

    @property
    def qarray(self) -> QArray:
        return self.get_raw_value()


class QuantScale(nnx.Variable):
    """A learned quantization scale (LSQ step, BiPer/XNOR alpha)."""


class InputTransform(nnx.Variable):
    """A frozen module's input transform (:mod:`qjax.input_transform`, e.g. SmoothQuant's or AWQ's
    per-channel divisor ``{"divisor": s}``): applied to its contraction input; its weight holds
    ``diag(s) W``."""


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


@dataclasses.dataclass(frozen=True)
class _Config:
    """What a swapped module knows (static, hashable): its entry, the settings, whether it is the root."""

    entry: ModuleEntry | None
    settings: Settings
    root: bool = False


# --- calls --------------------------------------------------------------------------------------------

_local = threading.local()  # .hparams: the root call's hyperparameters; .record: the record pass's table


@contextlib.contextmanager
def _setting(name: str, value) -> Iterator[None]:
    old = getattr(_local, name, None)
    setattr(_local, name, value)
    try:
        yield
    finally:
        setattr(_local, name, old)


def _scale_name(param: str) -> str:
    return f"{param}_qscale"


def _value(module, name):
    var = getattr(module, name, None)
    return var.get_value() if isinstance(var, nnx.Variable) else None


def _record_call(module, method, args, kwargs):
    """Record pass: which own parameters the call contracts, by which op, at which shapes."""
    own = {k: v.get_value() for k, v in vars(module).items()
           if isinstance(v, nnx.Variable) and hasattr(v.get_raw_value(), "shape")}
    record = _local.record.setdefault(getattr(module, CONFIG), Record(type(module).__name__, tuple(own)))
    with intercepting(record.observe(own, args).handle):
        return method(module, *args, **kwargs)


def _quantized_call(module, method, args, kwargs):
    config: _Config = getattr(module, CONFIG)
    if config.root and hasattr(module, HPARAMS):
        with _setting("hparams", getattr(module, HPARAMS).as_dict()):
            return _module_call(module, config, method, args, kwargs)
    return _module_call(module, config, method, args, kwargs)


def _module_call(module, config: _Config, method, args, kwargs):
    entry = config.entry
    if entry is None or entry.rule is None:
        with intercepting(None):
            return method(module, *args, **kwargs)
    hparams = getattr(_local, "hparams", None) or {}
    rule = entry.rule
    weights, restore = {}, []
    for name in entry.weights:
        var = getattr(module, name)
        raw = var.get_raw_value()
        scale = _value(module, _scale_name(name))
        if isinstance(raw, QArray):  # frozen: the module reads this dequantized array
            value = dequantize(raw)
            var.set_raw_value(value)
            restore.append((var, raw))
            weights[name] = Weight(name, None, value, None, raw)
        elif not entry.intercepted:  # contracted by `x @ w`: quantized where it is stored
            var.set_raw_value(qat.quantize_weight(rule.weight, raw, scale, hparams))
            restore.append((var, raw))
        else:
            weights[name] = Weight(name, var.get_value(), var.get_value(), scale)
    input_scale = _value(module, INPUT_SCALE)
    transform = _value(module, INPUT_TRANSFORM)
    args = quantize_at_module(entry, args, input_scale, hparams, transform)
    try:
        with intercepting(Call(entry, weights, hparams, config.settings, input_scale,
                               input_transform=transform).handle):
            return method(module, *args, **kwargs)
    finally:
        for var, raw in restore:
            var.set_raw_value(raw)


def _wrap(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if getattr(_local, "record", None) is not None:
            return _record_call(self, method, args, kwargs)
        return _quantized_call(self, method, args, kwargs)

    wrapper.__qjax_original__ = method
    return wrapper


def _methods(cls: type) -> dict[str, object]:
    """``__call__`` and the public methods of the model's own (non-Flax) classes."""
    out = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, nnx.Module) or not issubclass(klass, nnx.Module):
            continue
        own_code = not klass.__module__.startswith("flax.")
        for name, value in vars(klass).items():
            if callable(value) and not isinstance(value, type | staticmethod | classmethod | property) and (
                    name == "__call__" or (own_code and not name.startswith("_"))):
                out[name] = value
    return out


@functools.cache
def _swapped_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose methods run through qjax (module docstring)."""
    namespace = {name: _wrap(fn) for name, fn in _methods(cls).items()}
    namespace.update(__qualname__=cls.__qualname__, __module__=cls.__module__, __qjax_base__=cls)
    return type(cls)(cls.__name__, (cls,), namespace)


def _swap(module: nnx.Module, config) -> None:
    object.__setattr__(module, CONFIG, config)
    if not hasattr(type(module), "__qjax_base__"):
        object.__setattr__(module, "__class__", _swapped_class(type(module)))


def _unswap(module: nnx.Module) -> None:
    base = getattr(type(module), "__qjax_base__", None)
    if base is not None:
        object.__setattr__(module, "__class__", base)
    if CONFIG in vars(module):
        object.__delattr__(module, CONFIG)


def _modules(model: nnx.Module):
    return [("/".join(str(p) for p in path), m) for path, m in nnx.iter_modules(model)
            if not isinstance(m, Hyperparams)]


# --- tables -------------------------------------------------------------------------------------------

def _record(model: nnx.Module, args, kwargs) -> tuple[dict, dict]:
    """One abstract trace of ``model(*args)`` on a merged copy: per module path its record, and the
    ``(module path, attribute)`` pairs whose values reach a contraction."""
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = []
    for key_path, _ in flat:
        keys = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
        names.append(("/".join(keys[:-1]), keys[-1]))
    records: dict = {}

    def run(leaves):
        copy = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        for path, m in _modules(copy):
            _swap(m, path)
        with _setting("record", records):
            out = copy(*args, **kwargs)
        for record in records.values():
            record.inputs = None  # tracers of this trace must not outlive it
        return out

    try:
        contracted = {names[i] for i in contracted_leaves(run, [leaf for _, leaf in flat])}
    except (FlaxError, TypeError, ValueError) as err:
        raise ValueError(f"qjax.nnx: model(*example inputs) failed while qjax traced it to find what it "
                         f"contracts ({type(err).__name__}: {str(err)[:400]}); pass example inputs the "
                         "model's call accepts") from err
    stored = {}
    for (path, attr), (_, leaf) in zip(names, flat, strict=True):
        stored.setdefault((path, attr), jnp.shape(leaf))
    return records, {"contracted": contracted, "stored": stored}


def _entries(model: nnx.Module, args, kwargs) -> list[ModuleEntry]:
    records, found = _record(model, args, kwargs)
    return [records[path].entry(tuple(path.split("/")) if path else (),
                                {p for m, p in found["contracted"] if m == path},
                                {p: shape for (m, p), shape in found["stored"].items() if m == path})
            for path, _ in _modules(model) if path in records]


def module_table(model: nnx.Module, rules, *args, **kwargs) -> dict[str, ModuleEntry]:
    """Module path -> :class:`~qjax.core.ModuleEntry` with its rule, for ``model(*args, **kwargs)``.
    A quantized model answers from what it was quantized with (``args`` unused)."""
    if _configs(model):
        return {name: config.entry for name, config in _configs(model).items() if config.entry is not None}
    _need_example(args, kwargs, "module_table")
    return assign(check_rules(rules), _entries(model, args, kwargs), warn=False)


def dry_run(model: nnx.Module, rules, *args, **kwargs) -> str:
    """The printable table of module path -> rule for ``model`` (``-`` for float)."""
    return format_table({p: e.rule for p, e in module_table(model, rules, *args, **kwargs).items()})


def _need_example(args, kwargs, who: str) -> None:
    if not args and not kwargs:
        raise ValueError(f"qjax.nnx.{who} needs example inputs for the model's call (e.g. "
                         f"{who}(model, rules, x)): qjax finds which modules contract which parameters "
                         "by tracing one call")


def _configs(model: nnx.Module) -> dict[str, _Config]:
    return {path: getattr(m, CONFIG) for path, m in _modules(model) if isinstance(getattr(m, CONFIG, None),
                                                                                  _Config)}


# --- the transform ------------------------------------------------------------------------------------

def quantize_model(model: nnx.Module, rules, *args, hparams: dict | None = None, product: str = "auto",
                   backend: str = "auto", residuals: str = "quantized", warn_unused: bool = True,
                   **kwargs) -> Hyperparams:
    """Quantize ``model`` in place by ``rules``; ``args``/``kwargs`` are example inputs of its call.

    Returns the shared :class:`Hyperparams` (declare each per-step hyperparameter you will change, e.g.
    ``hparams={"o": 1.0}``). ``product``, ``backend`` and ``residuals`` are static settings
    (:class:`qjax.core.Settings`).
    Raises ``ValueError`` before changing anything for a model already quantized, a rule naming a module
    qjax cannot quantize, rules with a quantizer of which none matches a module (the message lists the
    modules qjax can quantize; ``warn_unused=False`` allows it, and silences the warning about a rule
    that matches nothing while others match), or missing or unusable example inputs.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"qjax.nnx.quantize_model expects an nnx.Module, got {type(model).__name__} "
                        "(a flax.linen Module: use qjax.linen.quantize_model)")
    if _configs(model):
        raise ValueError("the model is already quantized; call qjax.nnx.unquantize_model first")
    rules = check_rules(rules)
    settings = Settings(product, backend, residuals)
    shared = Hyperparams(**(hparams or {}))
    _need_example(args, kwargs, "quantize_model")
    entries = _entries(model, args, kwargs)
    table = assign(rules, entries, warn=warn_unused)
    learned_inputs = [e for e in table.values() if e.rule is not None and qat.needs_state(e.rule.input)]
    for e in learned_inputs:
        if e.stacked:
            raise ValueError(f"module {e.name!r}: learned input scales of layers stacked by scan are not "
                             "supported; use a computed input scale rule")
    input_scales = _initial_input_scales(model, learned_inputs, args, kwargs) if learned_inputs else {}
    modules = dict(_modules(model))
    for path, module in modules.items():
        entry = table.get(path)
        if entry is not None and entry.rule is not None and qat.needs_state(entry.rule.weight):
            for name in entry.weights:
                scale = initial_weight_scale(entry.rule.weight, _value(module, name), entry.stacked)
                setattr(module, _scale_name(name), QuantScale(scale))
        if path in input_scales:
            setattr(module, INPUT_SCALE, QuantScale(input_scales[path]))
        _swap(module, _Config(entry, settings, root=(path == "")))
    setattr(model, HPARAMS, shared)
    return shared


def _initial_input_scales(model, entries, args, kwargs) -> dict[str, jax.Array]:
    """LSQ's data-dependent start ``2 mean|x| / sqrt(fmax)`` of each learned input scale, from the example
    input each module gets (one jitted pass on a merged copy)."""
    wanted = {e.name: e.rule.input for e in entries}
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        records: dict = {}
        copy = nnx.merge(graphdef, state)
        for path, m in _modules(copy):
            _swap(m, path)
        with _setting("record", records):
            copy(*args, **kwargs)
        return {p: qat.initial_scale(q, jax.lax.stop_gradient(records[p].inputs))
                for p, q in wanted.items() if p in records and records[p].inputs is not None}

    return run(state)


def paths(model: nnx.Module) -> dict[str, str]:
    """Module path -> how its contraction runs (:func:`qjax.core.execution_path`), for a model quantized
    by :func:`quantize_model` (``ValueError`` for one that is not)."""
    if not _configs(model):
        raise ValueError("qjax.nnx.paths: the model is not quantized; call qjax.nnx.quantize_model first")
    hparams = getattr(model, HPARAMS).as_dict() if hasattr(model, HPARAMS) else {}
    out = {}
    modules = dict(_modules(model))
    for name, config in _configs(model).items():
        entry = config.entry
        if entry is None or entry.rule is None:
            continue
        raw = getattr(modules[name], entry.weights[0]).get_raw_value() if entry.weights else None
        ndim = None if raw is None else len(raw.shape) - entry.stacked
        out[name] = execution_path(entry, hparams, config.settings,
                                   raw if isinstance(raw, QArray) else None, ndim)
    return out


def summary_params(model: nnx.Module) -> tuple[dict, dict[str, str]]:
    """The model's parameters (float or :class:`PackedWeight` QArrays) as a nested dict by module path, and
    module path -> rule label, for :func:`qjax.summary.summary`."""
    params: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, PackedWeight))):
        node = params
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = var.get_raw_value()
    labels = {name: config.entry.rule.label for name, config in _configs(model).items()
              if config.entry is not None and config.entry.rule is not None}
    return params, labels


def freeze(model: nnx.Module, *, backend: str | None = None) -> None:
    """Turn a quantized model's trained weights into packed QArrays, in place.

    Each weight a rule quantizes becomes a :class:`PackedWeight` holding exactly the codes and scales that
    QAT used (learned scales folded in; one set per layer of a stacked module), packed in uint32 words
    along the contraction axis for Dense-like layers (:func:`qjax.serving.pack_axis`), its variable
    metadata kept. Linear-like layers then run on :func:`kernels_pallas.packed_matmul` (``backend``, or the
    one given to :func:`quantize_model`); inputs keep their QAT quantizers. One weight at a time: no second
    copy of the model's weights is held.
    """
    configs = _configs(model)
    if not configs:
        raise ValueError("qjax.nnx.freeze: the model is not quantized; call qjax.nnx.quantize_model first")
    hparams = getattr(model, HPARAMS).as_dict() if hasattr(model, HPARAMS) else {}
    modules = dict(_modules(model))
    for name, config in configs.items():
        module, entry = modules[name], config.entry
        if backend is not None:
            settings = dataclasses.replace(config.settings, backend=backend)
            config = dataclasses.replace(config, settings=settings)
            object.__setattr__(module, CONFIG, config)
        if entry is None or entry.rule is None:
            continue
        for param in entry.weights:
            var = getattr(module, param)
            if isinstance(var, PackedWeight):
                continue
            qa = frozen_weight(entry.rule.weight, var.get_value(), _value(module, _scale_name(param)),
                               hparams, entry.contract, entry.stacked)
            setattr(module, param, PackedWeight(qa, **var.get_metadata()))
            if hasattr(module, _scale_name(param)):
                delattr(module, _scale_name(param))


def unquantize_model(model: nnx.Module) -> None:
    """Undo :func:`quantize_model` in place (classes restored, scales and hyperparameters removed). A
    frozen model cannot be unquantized (its float weights are gone); a model that is not quantized is left
    as it is."""
    for _, module in _modules(model):
        if any(isinstance(v, PackedWeight) for v in vars(module).values()):
            raise ValueError("qjax.nnx.unquantize_model: the model is frozen; its float weights are gone")
    for _, module in _modules(model):
        for k in [k for k, v in vars(module).items() if isinstance(v, QuantScale)]:
            delattr(module, k)
        _unswap(module)
    if hasattr(model, HPARAMS):
        delattr(model, HPARAMS)
