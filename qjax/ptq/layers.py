"""Which weights a PTQ method quantizes, where they live in a params tree, and the Linen frozen result.

Every PTQ method in :mod:`qjax.ptq` takes ``(model, variables, rules, batches)``: a Flax Linen module with
its float variables, or an NNX module with ``variables=None`` (:mod:`qjax.ptq.model`); the
:class:`~qjax.Rule` list saying which weights get which quantizer; and calibration batches. A *batch* is a
dict of arrays passed as keyword arguments to the model (``model.apply(variables, **batch, **apply_kwargs)``
in Linen, ``model(**batch, **apply_kwargs)`` in NNX); ``apply_kwargs`` holds the static, non-array
arguments (e.g. ``deterministic=True``).

The quantized weights are the ones the front end's own table assigns a rule with a ``weight`` quantizer
(:meth:`qjax.linen.QuantizedModel.table`, :func:`qjax.nnx.module_table`: the table the QAT transforms
use), so the rules mean the same in QAT and in PTQ. Each is a :class:`Layer`; a method's result is a dict
``path -> QArray`` (unpacked codes, one per quantized weight), which the model view turns into the front
end's frozen model (:func:`frozen_variables` for Linen).

A *params tree* is a nested dict keyed by module path components then the parameter name: Linen's
``variables["params"]`` (partitioning boxes read through and written back), NNX's ``nnx.Param`` state as
a pure dict (list indices as ``int`` keys; a :class:`Layer` path names them as strings).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import stacked_map
from qjax.linen import rebox, serving_variables, unbox
from qjax.qarray import QArray, dequantize, unpack
from qjax.quantizer import Quantizer
from qjax.serving import pack_for_serving

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One quantized weight: its path (module path + parameter name), its quantizer, how many leading
    axes its module contracts (1 for Dense; :attr:`qjax.core.ModuleEntry.contract`) and how many leading
    axes stack layers (``vmap``-stacked layers run by ``scan``: one quantization per layer)."""

    path: Path
    quantizer: Quantizer
    contract: int
    stacked: int = 0

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def module(self) -> Path:
        return self.path[:-1]


def check_batches(batches: Sequence[Mapping[str, jax.Array]], who: str) -> list[dict]:
    """The batches as a list of dicts of arrays; a clear error for anything else."""
    if isinstance(batches, Mapping):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise ValueError(f"{who}: batches is empty; allowed: a non-empty sequence of dicts of arrays "
                         "(each passed as model.apply(variables, **batch))")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ValueError(f"{who}: batch {i} is a {type(batch).__name__}; allowed: a dict of arrays "
                             "passed as keyword arguments to the model")
        for key, value in batch.items():
            if value is None:  # an absent optional input (e.g. a cache)
                continue
            scalar = isinstance(value, bool | int | float)
            dtype = np.result_type(value) if scalar else getattr(value, "dtype", None)
            if dtype is None or not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
                raise TypeError(f"{who}: batch {i}[{key!r}] is a {type(value).__name__} of dtype {dtype}; "
                                "allowed: numeric or bool arrays, or None (static arguments go in "
                                "apply_kwargs)")
        kinds, first = _layout(batch), _layout(batches[0])
        if kinds != first:
            raise ValueError(f"{who}: batch {i} has keys, ranks and dtype kinds {kinds}, batch 0 {first}; "
                             "allowed: batches of the same inputs (lengths may differ)")
    return [dict(b) for b in batches]


def _layout(batch: Mapping) -> dict:
    return {k: None if v is None else (jnp.ndim(v), jnp.result_type(v).kind) for k, v in batch.items()}


def check_token_mask(batches: Sequence[Mapping], token_mask: str | None, who: str) -> None:
    """A concrete ``batch[token_mask]`` must be finite and >= 0, and not 0 everywhere: a calibration set
    whose every token is masked (an inverted mask) has no input to calibrate on. Traced masks pass."""
    masks = [b[token_mask] for b in batches if token_mask and token_mask in b]
    if not masks or any(isinstance(m, jax.core.Tracer) for m in masks):
        return
    values = [np.asarray(m, np.float64) for m in masks]
    for i, v in enumerate(values):
        bad = v[~(np.isfinite(v) & (v >= 0))]
        if bad.size:
            raise ValueError(f"{who}: batch {i}[{token_mask!r}] holds {bad[:3]}; allowed: finite weights "
                             ">= 0 (1 for a real token, 0 for padding)")
    if not any(np.any(v > 0) for v in values):
        raise ValueError(f"{who}: every token of every batch is masked (batch[{token_mask!r}] == 0 "
                         "everywhere): nothing to calibrate on; allowed: 1 for real tokens and 0 for padding "
                         "(is the mask inverted?), or token_mask=None to use every token")


def quantized_layers(model, variables: Mapping | None, batch: Mapping, apply_kwargs: Mapping | None = None,
                     rules=None) -> list[Layer]:
    """The weights the rules quantize, in the order the model calls their modules.

    ``model``: a :class:`~qjax.linen.QuantizedModel` (its rules; ``rules`` unused), a Linen module with
    ``rules``, or an NNX module (``variables=None``) with ``rules``. Raises ``ValueError`` when no weight
    matches (PTQ of nothing is a mistake, not a no-op).
    """
    from qjax.ptq.model import model_view

    return model_view(model, variables, rules, batch, apply_kwargs, "quantized_layers").layers


def _key(tree: Mapping, part: str):
    """The key of ``tree`` named ``part`` (an NNX list index is an ``int`` key named ``"0"``)."""
    if part in tree:
        return part
    return next((k for k in tree if str(k) == part), None)


def get_path(tree, path: Path, default=None):
    """The value at ``path`` (keys matched by name) in a nested dict, else ``default``."""
    for part in path:
        key = _key(tree, part) if isinstance(tree, Mapping) else None
        if key is None:
            return default
        tree = tree[key]
    return tree


def _set(tree: Mapping, path: Path, value) -> dict:
    key = _key(tree, path[0])
    key = path[0] if key is None else key
    out = dict(tree)
    if len(path) == 1:
        out[key] = value if value is None else rebox(tree.get(key), value)
    else:
        out[key] = _set(tree.get(key) or {}, path[1:], value)
    return out


def weight(params: Mapping, layer: Layer) -> jax.Array:
    """The float weight of ``layer`` in ``params`` (read through a partitioning box; a QArray there is
    dequantized)."""
    w = unbox(get_path(params, layer.path))
    if w is None:
        raise ValueError(f"parameter {layer.name!r} is missing from params")
    return dequantize(w) if isinstance(w, QArray) else w


def with_weights(params: Mapping, values: Mapping[Path, jax.Array | QArray | None]) -> dict:
    """A copy of ``params`` with the weight at each path replaced by ``values[path]`` (in the old value's
    partitioning box, if any)."""
    out = dict(params)
    for path, value in values.items():
        out = _set(out, path, value)
    return out


def dequantized_params(params: Mapping, qarrays: Mapping[Path, QArray]) -> dict:
    """``params`` with each quantized weight replaced by its dequantized float value."""
    return with_weights(params, {p: dequantize(q) for p, q in qarrays.items()})


def packed(layer: Layer, qa: QArray) -> QArray:
    """``qa`` packed the way every freeze stores it (:func:`qjax.serving.pack_for_serving`: along K for
    Dense-like layers), one packing per layer of a stacked weight."""
    if not layer.stacked:
        return pack_for_serving(unpack(qa), layer.contract)
    return _packed_stacked(layer.contract, layer.stacked, qa)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _packed_stacked(contract: int, stacked: int, qa: QArray) -> QArray:
    # one compilation per shape, not one per eager op under vmap
    return stacked_map(lambda q: pack_for_serving(unpack(q), contract), stacked)(qa)


def frozen_variables(variables: Mapping, layers: Sequence[Layer], qarrays: Mapping[Path, QArray]) -> dict:
    """Linen serving variables: each quantized weight as a QArray packed the way :func:`qjax.linen.freeze`
    packs it (:func:`packed`); other collections and input scales kept
    (:func:`qjax.linen.serving_variables`)."""
    values = {layer.path: packed(layer, qarrays[layer.path]) for layer in layers}
    return serving_variables(variables, with_weights(variables["params"], values))
