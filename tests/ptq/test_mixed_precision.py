"""Mixed precision under a byte budget: the Hessian-weighted output error in closed form, the exact knapsack
against brute force, its Pareto front, a sensitive layer getting more bits, and clear errors."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax import PerChannel, Quantizer, quantize
from qjax.ptq.mixed_precision import Option, allocate, layer_options, output_error, pareto, total

K, N, ROWS = 64, 32, 256


def _inputs(seed, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (ROWS, K)) * jnp.linspace(0.3, 2.0, K) * scale
    w = jax.random.normal(k2, (K, N)) * 0.05
    return x, w, 2 * x.T @ x / ROWS


def test_output_error_is_the_scaled_output_difference():
    x, w, h = _inputs(0)
    q = Quantizer("int4", PerChannel(-1), "absmax")
    xd, wd = np.asarray(x, np.float64), np.asarray(w, np.float64)
    wq = np.asarray(quantize(q, w).dequantize(), np.float64)
    expected = 2 / ROWS * np.sum((xd @ wd - xd @ wq) ** 2)
    h64 = 2 * xd.T @ xd / ROWS
    np.testing.assert_allclose(output_error(w, h64, q), expected, rtol=1e-9)
    np.testing.assert_allclose(output_error(w, h, q), expected, rtol=1e-5)  # float32 Hessian
    assert output_error(w, h64, quantize(q, w)) == output_error(w, h64, q)  # a precomputed QArray
    with pytest.raises(ValueError, match=r"hessian has shape \(3, 3\)"):
        output_error(w, np.eye(3), q)


def _brute(options, budget):
    names = list(options)
    best = None
    for combo in itertools.product(*(range(len(options[n])) for n in names)):
        size, loss = total(options, dict(zip(names, combo, strict=True)))
        if size <= budget and (best is None or (loss, size) < best):
            best = (loss, size)
    return best


@st.composite
def _instances(draw):
    unit = draw(st.sampled_from([1, 3, 64]))
    loss = st.one_of(st.integers(0, 4).map(float), st.floats(0, 10, allow_nan=False))
    option = st.builds(lambda b, v: (b * unit, v), st.integers(0, 6), loss)
    layers = draw(st.lists(st.lists(option, min_size=1, max_size=3), min_size=1, max_size=4))
    options = {f"l{i}": [Option(f"o{j}", b, v) for j, (b, v) in enumerate(opts)]
               for i, opts in enumerate(layers)}
    budget = draw(st.integers(0, 6 * unit * len(layers) + unit))
    return options, budget


@settings(max_examples=25, deadline=None)
@given(_instances())
def test_allocate_equals_brute_force(instance):
    options, budget = instance
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    if smallest > budget:
        with pytest.raises(ValueError, match=rf"smallest achievable total is {smallest} B"):
            allocate(options, budget)
        return
    choice = allocate(options, budget)
    size, loss = total(options, choice)
    assert size <= budget
    assert (loss, size) == _brute(options, budget)  # least loss, then fewest bytes


@settings(max_examples=25, deadline=None)
@given(_instances())
def test_pareto_front_is_monotone_and_holds_every_allocation(instance):
    options, _ = instance
    front = pareto(options)
    sizes, losses = [p[0] for p in front], [p[1] for p in front]
    assert all(a < b for a, b in itertools.pairwise(sizes))
    assert all(a > b for a, b in itertools.pairwise(losses))
    for size, loss, choice in front:
        assert total(options, choice) == (size, loss)
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    largest = sum(max(o.bytes for o in opts) for opts in options.values())
    assert sizes[0] == smallest
    for budget in range(smallest, largest + 1, max(1, (largest - smallest) // 7)):
        point = next(p for p in reversed(front) if p[0] <= budget)
        choice = allocate(options, budget)
        assert total(options, choice) == point[:2] and choice == point[2]
        assert point[1] == _brute(options, budget)[0]


BITS = {"int2": 2, "int4": 4, "int8": 8}


def test_sensitive_layer_gets_more_bits_than_uniform():
    quantizers = {f: Quantizer(f, PerChannel(-1), "minmax") for f in BITS}
    options = {}
    for i, scale in enumerate([10.0, 1.0, 1.0]):  # layer 0's Hessian 100x the others'
        _, w, h = _inputs(i + 1)
        options[f"layer{i}"] = layer_options(w, scale**2 * h, quantizers)
    uniform = {name: list(quantizers).index("int4") for name in options}
    budget, uniform_loss = total(options, uniform)
    choice = allocate(options, budget)
    size, loss = total(options, choice)
    bits = {name: BITS[options[name][j].name] for name, j in choice.items()}
    assert size <= budget and loss < uniform_loss
    assert bits["layer0"] > 4 and sum(bits.values()) <= 3 * 4, bits
    assert any(p[:2] == (size, loss) for p in pareto(options))


def test_bad_inputs_raise_naming_the_value():
    with pytest.raises(ValueError, match="bytes=-3"):
        Option("a", -3, 1.0)
    with pytest.raises(ValueError, match="loss=nan"):
        Option("a", 3, math.nan)
    with pytest.raises(ValueError, match="loss=inf"):
        Option("a", 3, math.inf)
    with pytest.raises(ValueError, match="bytes=True"):
        Option("a", True, 1.0)
    with pytest.raises(ValueError, match="non-empty mapping"):
        allocate({}, 10)
    with pytest.raises(ValueError, match="layer 'x' has no options"):
        allocate({"x": []}, 10)
    opts = {"x": [Option("a", 4, 1.0), Option("b", 8, 0.5)], "y": [Option("a", 6, 2.0)]}
    with pytest.raises(ValueError, match="budget=-1"):
        allocate(opts, -1)
    with pytest.raises(ValueError, match=re.escape("budget 9 B is infeasible; the smallest achievable total "
                                                   "is 10 B")):
        allocate(opts, 9)
    assert allocate(opts, 13) == {"x": 0, "y": 0} and allocate(opts, 14) == {"x": 1, "y": 0}
    big = {f"l{i}": [Option("a", 1, 1.0), Option("b", 10**7, 0.0)] for i in range(10)}
    with pytest.raises(ValueError, match="over the limit max_cells=50000000"):
        allocate(big, 10**8)
    with pytest.raises(ValueError, match="over the limit max_cells=50000000"):
        pareto(big)
