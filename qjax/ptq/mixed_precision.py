"""Mixed precision at the layer level: one quantizer per layer, chosen to minimise the summed estimated output
error under a byte budget.

Each layer ``l`` has a few options ``j`` (a quantizer: its format, granularity, scale rule), each with its
stored size ``b_lj`` in bytes and an estimated loss ``L_lj``. The loss is the Hessian-weighted weight error of
GPTQ / OBS (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023): for a Dense kernel ``W (K, N)`` (``y = x W``) with calibration inputs
``X (n, K)`` and ``H = 2 X^T X / n`` (:func:`qjax.ptq.hessians`),

    ``L(W_q) = tr(E^T H E) = (2 / n) ||X W - X W_q||_F^2``,  ``E = W - W_q``

(:func:`output_error`), the second-order term HAWQ (Dong et al., ICCV 2019; HAWQ-V3, Yao et al., "HAWQ-V3:
Dyadic Neural Network Quantization", ICML 2021) uses as a layer's sensitivity. Layers are taken as
independent (the loss of a model is the sum of its layers' losses, no cross-layer terms), and the bit
allocation is HAWQ-V3's integer program

    ``min_c sum_l L_{l c_l}``  subject to  ``sum_l b_{l c_l} <= budget``,

a multiple-choice knapsack, solved exactly (:func:`allocate`) by a dynamic program over total bytes after
dividing every byte count by their gcd; :func:`pareto` gives the whole bytes-vs-loss front from the same
program.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.qarray import QArray, dequantize
from qjax.quantizer import Quantizer, fake_quant, quantize

__all__ = ["MAX_CELLS", "Option", "allocate", "layer_options", "output_error", "pareto", "total"]

MAX_CELLS = 50_000_000
"""The largest dynamic-programming table :func:`allocate` and :func:`pareto` build: ``layers * (B + 1)``
cells, ``B`` the byte capacity in units of the byte counts' gcd (one byte per cell for up to 255 options a
layer; ``5e7`` cells are 50 MB and about ``options * 5e7`` float operations)."""


def _as_matrix(w, hessian, contract: int, who: str) -> tuple[np.ndarray, np.ndarray]:
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{who}: w must be a floating-point array, got dtype {w.dtype}")
    if isinstance(contract, bool) or not isinstance(contract, int) or not 1 <= contract < w.ndim:
        raise ValueError(f"{who}: weight of shape {tuple(w.shape)} with contract={contract!r}; allowed: a "
                         "(*K, *F) kernel whose leading contract >= 1 axes are the input ones, at least one "
                         "output axis left (a Dense (in, out) kernel: contract=1)")
    k = math.prod(w.shape[:contract])
    h = np.asarray(hessian, np.float64)
    if h.shape != (k, k):
        raise ValueError(f"{who}: hessian has shape {h.shape}; allowed: ({k}, {k}) for a weight of shape "
                         f"{tuple(w.shape)} contracting {contract} axes")
    if not np.all(np.isfinite(h)):
        raise ValueError(f"{who}: hessian has non-finite entries; allowed: finite values (H = 2 X^T X / n)")
    return w, h


def output_error(w: jax.Array, hessian: jax.Array, quantizer: Quantizer | QArray, contract: int = 1) -> float:
    """The estimated increase of a layer's output error when its weight is quantized: ``tr(E^T H E)``.

    ``E = W - W_q`` with ``W_q = fake_quant(quantizer, W)`` (or ``dequantize(quantizer)`` of a QArray already
    computed from ``W``, e.g. by :func:`qjax.ptq.gptq_layer`), ``W`` a ``(*K, *F)`` kernel seen as the
    ``(K, F)`` matrix of its flattened axes (its leading ``contract`` axes the input ones). For GPTQ's
    Hessian ``H = 2 X^T X / n`` of calibration inputs ``X (n, K)`` this is ``(2 / n) ||X W - X W_q||_F^2``,
    the quantity GPTQ (Frantar et al., ICLR 2023) minimises and the second-order sensitivity of HAWQ /
    HAWQ-V3 (Yao et al., ICML 2021). Computed in float64 from the float32 weights.
    """
    w, h = _as_matrix(w, hessian, contract, "output_error")
    if isinstance(quantizer, QArray):
        if quantizer.shape != tuple(w.shape):
            raise ValueError(f"output_error: QArray of shape {quantizer.shape} for a weight of shape "
                             f"{tuple(w.shape)}; allowed: a QArray quantizing w itself")
        wq = dequantize(quantizer)
    elif isinstance(quantizer, Quantizer):
        wq = fake_quant(quantizer, w)
    else:
        raise TypeError(f"output_error expects a Quantizer or a QArray, got {type(quantizer).__name__}")
    k = h.shape[0]
    e = np.asarray(w, np.float64).reshape(k, -1) - np.asarray(wq, np.float64).reshape(k, -1)
    return float(np.sum(e * (h @ e)))


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to store a layer: a ``name`` (e.g. the quantizer's), its size ``bytes`` (an integer >= 0)
    and its estimated ``loss`` (a finite float, e.g. :func:`output_error`)."""

    name: str
    bytes: int
    loss: float

    def __post_init__(self):
        try:
            size = operator.index(self.bytes)
        except TypeError:
            size = None
        if size is None or isinstance(self.bytes, bool) or size < 0:
            raise ValueError(f"Option {self.name!r}: bytes={self.bytes!r}; allowed: an integer >= 0")
        try:
            loss = float(self.loss)
        except (TypeError, ValueError):
            loss = math.nan
        if not math.isfinite(loss):
            raise ValueError(f"Option {self.name!r}: loss={self.loss!r}; allowed: a finite number")
        object.__setattr__(self, "bytes", int(size))
        object.__setattr__(self, "loss", loss)


def layer_options(w: jax.Array, hessian: jax.Array, quantizers: Mapping[str, Quantizer],
                  contract: int = 1) -> list[Option]:
    """The options of one layer: for each named quantizer, ``Option(name, bytes, loss)`` with ``bytes`` the
    stored size of ``quantize(q, w).pack(0)`` (:attr:`qjax.QArray.nbytes`: codes packed into uint32 words,
    scales, zero points) and ``loss = tr(E^T H E)`` (:func:`output_error`; GPTQ's Hessian, HAWQ-V3's
    sensitivity) of round-to-nearest."""
    out = []
    for name, q in quantizers.items():
        qa = quantize(q, jnp.asarray(w))
        out.append(Option(name, qa.pack(0).nbytes, output_error(w, hessian, qa, contract)))
    return out


def _check_options(options: Mapping[str, Sequence[Option]], who: str) -> list[tuple[str, list[Option]]]:
    if not isinstance(options, Mapping) or not options:
        raise ValueError(f"{who}: options={options!r}; allowed: a non-empty mapping from layer name to a "
                         "non-empty sequence of Option")
    layers = []
    for name, opts in options.items():
        opts = list(opts)
        if not opts:
            raise ValueError(f"{who}: layer {name!r} has no options; allowed: at least one Option")
        for o in opts:
            if not isinstance(o, Option):
                raise TypeError(f"{who}: layer {name!r} has option {o!r}; allowed: Option(name, bytes, loss)")
        layers.append((name, opts))
    return layers


def _solve(layers: list[tuple[str, list[Option]]], capacity: int, max_cells: int, who: str):
    """The exact-bytes table: ``dp[b]`` the least summed loss of a choice of ``b * g`` bytes (inf if none),
    summed in layer order, and ``arg[l, b]`` the option of layer ``l`` on that choice (the first on ties)."""
    g = math.gcd(*(o.bytes for _, opts in layers for o in opts)) or 1
    cap = min(capacity, sum(max(o.bytes for o in opts) for _, opts in layers)) // g
    cells = len(layers) * (cap + 1)
    if cells > max_cells:
        raise ValueError(f"{who}: the table would have {len(layers)} layers x {cap + 1} byte units of "
                         f"{g} B = {cells} cells, over the limit max_cells={max_cells}; allowed: coarser "
                         "byte counts (e.g. rounded up to a multiple of 256 B), fewer layers, or a larger "
                         "max_cells")
    most = max(len(opts) for _, opts in layers)
    arg = np.zeros((len(layers), cap + 1), np.uint8 if most <= 256 else np.int32)
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    for li, (_, opts) in enumerate(layers):
        new = np.full(cap + 1, np.inf)
        for j, o in enumerate(opts):
            b = o.bytes // g
            if b > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[b:] = dp[: cap + 1 - b] + o.loss
            better = cand < new
            new[better] = cand[better]
            arg[li, better] = j
        dp = new
    return dp, arg, g


def _choice(layers, arg, g: int, units: int) -> dict[str, int]:
    choice = {}
    for li in range(len(layers) - 1, -1, -1):
        name, opts = layers[li]
        j = int(arg[li, units])
        choice[name] = j
        units -= opts[j].bytes // g
    return {name: choice[name] for name, _ in layers}


def total(options: Mapping[str, Sequence[Option]], choice: Mapping[str, int]) -> tuple[int, float]:
    """``(sum_l b_{l c_l}, sum_l L_{l c_l})``: the total bytes and estimated loss (summed in layer order,
    as :func:`allocate` sums them) of a choice of one option index per layer."""
    layers = _check_options(options, "total")
    if set(choice) != {name for name, _ in layers}:
        raise ValueError(f"total: choice names {sorted(map(str, choice))}; allowed: exactly the layers "
                         f"{[name for name, _ in layers]}")
    size, loss = 0, 0.0
    for name, opts in layers:
        j = choice[name]
        if isinstance(j, bool) or not isinstance(j, int | np.integer) or not 0 <= j < len(opts):
            raise ValueError(f"total: layer {name!r} choice {j!r}; allowed: 0..{len(opts) - 1}")
        size, loss = size + opts[j].bytes, loss + opts[j].loss
    return size, loss


def allocate(options: Mapping[str, Sequence[Option]], budget: int,
             max_cells: int = MAX_CELLS) -> dict[str, int]:
    """One option index per layer minimising the summed loss under a byte budget, exactly.

    ``min_c sum_l L_{l c_l}`` subject to ``sum_l b_{l c_l} <= budget``: HAWQ-V3's integer program for bit
    allocation (Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization", ICML 2021) with GPTQ's
    Hessian-weighted error as the loss (:func:`output_error`). Solved as a multiple-choice knapsack by a
    dynamic program over total bytes in units of ``g = gcd`` of all byte counts: ``dp_l[b] = min_j
    dp_{l-1}[b - b_lj / g] + L_lj`` over ``B = min(budget, sum_l max_j b_lj) / g`` units, in
    ``O(sum_l |options_l| * B)`` time and ``L * (B + 1)`` cells (at most ``max_cells``, :data:`MAX_CELLS`).
    Of equal-loss choices the one with the fewest bytes is returned (then the lowest option indices).
    :func:`total` gives its bytes and loss.

    Raises ValueError for empty options, an option with negative bytes or a non-finite loss, a negative
    budget, a table over ``max_cells`` and a budget below the smallest achievable total (named).
    """
    layers = _check_options(options, "allocate")
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 0:
        raise ValueError(f"allocate: budget={budget!r}; allowed: an integer number of bytes >= 0")
    smallest = sum(min(o.bytes for o in opts) for _, opts in layers)
    if smallest > budget:
        raise ValueError(f"allocate: budget {int(budget)} B is infeasible; the smallest achievable total is "
                         f"{smallest} B (the smallest option of every layer)")
    dp, arg, g = _solve(layers, int(budget), max_cells, "allocate")
    units = int(np.argmin(dp))  # the first minimum: the fewest bytes among the least losses
    return _choice(layers, arg, g, units)


def pareto(options: Mapping[str, Sequence[Option]],
           max_cells: int = MAX_CELLS) -> list[tuple[int, float, dict[str, int]]]:
    """The exact Pareto front of total bytes vs total estimated loss: ``(bytes, loss, choice)`` by
    increasing bytes and strictly decreasing loss, each point the choice :func:`allocate` returns for any
    budget from its bytes up to the next point's (exclusive).

    The same dynamic program as :func:`allocate` (HAWQ-V3's integer program, Yao et al. ICML 2021, with
    GPTQ's Hessian-weighted loss) over the full capacity ``B = sum_l max_j b_lj / g``: the front is every
    total ``b`` whose least loss ``dp[b]`` is below that of every smaller total. ``O(sum_l |options_l| *
    B)`` time, ``L * (B + 1) <= max_cells`` cells; for the bytes-vs-fidelity plot.
    """
    layers = _check_options(options, "pareto")
    dp, arg, g = _solve(layers, sum(max(o.bytes for o in opts) for _, opts in layers), max_cells, "pareto")
    front, best = [], math.inf
    for units in np.flatnonzero(np.isfinite(dp)):
        if dp[units] < best:
            best = float(dp[units])
            front.append((int(units) * g, best, _choice(layers, arg, g, int(units))))
    return front
