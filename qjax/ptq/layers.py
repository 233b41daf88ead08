"""Which weights a PTQ method quantizes, and how its results become frozen params.

Every PTQ method in :mod:`qjax.ptq` takes ``(model, variables, rules, batches)``: a Flax Linen module, its
float variables, the :class:`~qjax.Rule` list saying which weights get which quantizer, and calibration
batches. A *batch* is a dict of arrays passed to ``model.apply(variables, **batch, **apply_kwargs)``;
``apply_kwargs`` holds the static, non-array arguments (e.g. ``deterministic=True``).

The quantized weights are the ones :class:`qjax.linen.QuantizedModel` assigns a rule with a ``weight``
quantizer (the same table the QAT transform uses), so the rules mean the same in QAT and in PTQ. A method's
result is a dict ``path -> QArray`` (unpacked codes, one per quantized weight); :func:`frozen_variables`
puts them, packed as :func:`qjax.linen.freeze` packs them, into the variables, and the frozen variables run
through ``quantize_model(model, rules).apply`` and :func:`qjax.summary.summary` like any frozen model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax

from qjax.linen import QuantizedModel, get_path, quantize_model, serving_variables, set_path
from qjax.qarray import QArray, dequantize, unpack
from qjax.quantizer import Quantizer
from qjax.serving import pack_for_serving

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One quantized weight: its path in ``params`` (module path + parameter name), its quantizer and
    how many trailing axes its module contracts (1 for Dense)."""

    path: Path
    quantizer: Quantizer
    contract: int

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
    return [dict(b) for b in batches]


def quantized_model(model: nn.Module, rules) -> QuantizedModel:
    """``quantize_model(model, rules)``; a :class:`~qjax.linen.QuantizedModel` passes through."""
    if isinstance(model, QuantizedModel):
        return model
    return quantize_model(model, rules)


def quantized_layers(qmodel: QuantizedModel, variables: Mapping, batch: Mapping,
                     apply_kwargs: Mapping | None = None) -> list[Layer]:
    """The weights the rules quantize, in the order the model calls their modules.

    Raises ``ValueError`` when no weight matches (PTQ of nothing is a mistake, not a no-op).
    """
    table = qmodel.table(dict(variables), **batch, **dict(apply_kwargs or {}))
    layers = [Layer((*entry.path, name), entry.rule.weight, entry.contract)
              for entry in table.values() for name in entry.weights]
    if not layers:
        raise ValueError(f"no weight matched a rule with a weight quantizer; rules: "
                         f"{[r.label for r in qmodel.rules]}; modules: {sorted(table)[:20]}")
    return layers


def weight(params: Mapping, layer: Layer) -> jax.Array:
    """The float weight of ``layer`` in ``params`` (a QArray there is dequantized)."""
    w = get_path(params, layer.path)
    if w is None:
        raise ValueError(f"parameter {layer.name!r} is missing from params")
    return dequantize(w) if isinstance(w, QArray) else w


def with_weights(params: Mapping, values: Mapping[Path, jax.Array | QArray]) -> dict:
    """A copy of ``params`` with the weight at each path replaced by ``values[path]``."""
    out = dict(params)
    for path, value in values.items():
        out = set_path(out, path, value)
    return out


def dequantized_params(params: Mapping, qarrays: Mapping[Path, QArray]) -> dict:
    """``params`` with each quantized weight replaced by its dequantized float value."""
    return with_weights(params, {p: dequantize(q) for p, q in qarrays.items()})


def frozen_variables(variables: Mapping, layers: Sequence[Layer], qarrays: Mapping[Path, QArray]) -> dict:
    """Serving variables: each quantized weight as a QArray packed the way :func:`qjax.linen.freeze`
    packs it (along K for Dense-like layers, :func:`qjax.serving.pack_for_serving`); other collections
    and input scales kept (:func:`qjax.linen.serving_variables`)."""
    packed = {layer.path: pack_for_serving(unpack(qarrays[layer.path]), layer.contract) for layer in layers}
    return serving_variables(variables, with_weights(variables["params"], packed))
