"""Model summary: per layer, the rule, bits, parameter count, theoretical and real bytes (as larq's summary).

``summarize(variables, rules_by_path)`` works on any params tree (float or frozen): every module path that
owns parameters is a row. For a parameter stored as a :class:`~qjax.QArray` the bits are its format's bits
and the real bytes are the bytes of its leaves (packed codes + scales + zero points); a float parameter
counts its dtype's bits. Theoretical bytes are ``count * bits / 8`` (no scales, no padding); real bytes are
``nbytes`` of the arrays that exist, which is what a checkpoint stores.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from qjax.qarray import QArray


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    path: str
    rule: str
    bits: str
    params: int
    theoretical_bytes: float
    real_bytes: int


@dataclasses.dataclass(frozen=True, repr=False)
class Summary:
    """Rows per layer and totals; ``str`` / ``repr`` (what ``print`` and a notebook show) is the table."""

    layers: tuple[LayerSummary, ...]

    @property
    def params(self) -> int:
        return sum(row.params for row in self.layers)

    @property
    def theoretical_bytes(self) -> float:
        return sum(row.theoretical_bytes for row in self.layers)

    @property
    def real_bytes(self) -> int:
        return sum(row.real_bytes for row in self.layers)

    def to_rows(self) -> list[dict]:
        return [dataclasses.asdict(row) for row in self.layers]

    def __str__(self) -> str:
        head = ("layer", "rule", "bits", "params", "theory B", "real B")
        rows = [(r.path or "(root)", r.rule, r.bits, f"{r.params:,}", f"{r.theoretical_bytes:,.0f}",
                 f"{r.real_bytes:,}") for r in self.layers]
        rows.append(("total", "", "", f"{self.params:,}", f"{self.theoretical_bytes:,.0f}",
                     f"{self.real_bytes:,}"))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True))
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])

    __repr__ = __str__


def _leaf_info(value) -> tuple[int, float, int, str]:
    """(element count, bits per element, real bytes, format label) of one parameter (read through a
    partitioning metadata box)."""
    if hasattr(value, "unbox") and not hasattr(value, "dtype"):
        value = value.unbox()
    if not isinstance(value, QArray) and not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise TypeError(f"qjax.summary: a parameter must be an array or a QArray, got {type(value).__name__}")
    if isinstance(value, QArray):
        count = math.prod(value.shape) * value.bases
        return count, value.fmt.bits, value.nbytes, value.format
    itemsize = np.dtype(value.dtype).itemsize
    return math.prod(value.shape), itemsize * 8, math.prod(value.shape) * itemsize, str(value.dtype)


def _modules(tree: Mapping, prefix: tuple[str, ...] = ()):
    """(module path, {param name: value}) for every dict that holds parameters."""
    own = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if own:
        yield prefix, own
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _modules(v, (*prefix, str(k)))


def summarize(params: Mapping, rules_by_path: Mapping[str, str] | None = None) -> Summary:
    """Per-module summary of a params tree; ``rules_by_path`` maps module path -> rule label."""
    if not isinstance(params, Mapping):
        raise TypeError(f"qjax.summary.summarize takes a params tree (a dict), got {type(params).__name__}")
    rules_by_path = rules_by_path or {}
    rows = []
    for path, own in _modules(params):
        name = "/".join(path)
        infos = {k: _leaf_info(v) for k, v in own.items()}
        labels = sorted({f"{label}:{bits:g}" for _, bits, _, label in infos.values()})
        rows.append(LayerSummary(
            path=name,
            rule=rules_by_path.get(name) or "-",
            bits=", ".join(labels),
            params=sum(i[0] for i in infos.values()),
            theoretical_bytes=sum(i[0] * i[1] / 8 for i in infos.values()),
            real_bytes=sum(i[2] for i in infos.values()),
        ))
    return Summary(tuple(rows))


def summary(qmodel, variables: Mapping | None = None, *args, **kwargs) -> Summary:
    """Summary of a model (print it: its ``str`` is the table; or read its rows and totals).

    Linen: ``summary(qmodel, variables, *args)`` for a :class:`~qjax.linen.QuantizedModel`'s (frozen or
    float) ``variables``; ``args`` are sample inputs, used to look up which rule each module got.
    NNX: ``summary(model)`` for a model quantized in place by :func:`qjax.nnx.quantize_model` (frozen or not).
    A model that is not quantized (a plain Linen module with its variables, an NNX model) gets its float
    summary: every rule ``-``, bits those of the dtypes.
    """
    import flax.linen as nn
    from flax import nnx

    from qjax import linen as qlinen
    from qjax import nnx as qnnx

    if isinstance(qmodel, nnx.Module):
        if variables is not None:
            raise TypeError("qjax.summary.summary(model) of an NNX model takes no variables (they live on "
                            "the model)")
        return summarize(*qnnx.summary_params(qmodel))
    if not isinstance(qmodel, qlinen.QuantizedModel | nn.Module):
        raise TypeError(f"qjax.summary.summary takes a qjax.linen.QuantizedModel (with its variables) or an "
                        f"NNX model, got {type(qmodel).__name__}")
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        raise ValueError("qjax.summary.summary(qmodel, variables, *inputs) of a Linen model needs its "
                         "variables, a dict with a 'params' collection (qmodel.init's or freeze's)")
    if isinstance(qmodel, nn.Module):
        return summarize(variables["params"])
    table = qmodel.table(variables, *args, **kwargs)
    labels = {name: entry.rule.label for name, entry in table.items() if entry.rule is not None}
    return summarize(variables["params"], labels)
