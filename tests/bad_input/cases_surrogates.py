"""Bad-input table, area "quantizers": surrogates and their hyperparameters (qjax.surrogates, qjax.qat,
the NNX ``Hyperparams`` that calls ``qat.check_hparams``).

Concrete hyperparameters are range-checked (``o``, ``t``, ``omega``, ``beta`` > 0, finite); traced ones
cannot be, so a surrogate makes the input gradient NaN everywhere for an out-of-range traced value and
leaves the forward as it is (``qjax/surrogates.py``, module docstring and ``Surrogate.__call__``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qjax import PerChannel, Quantizer, fake_quant, qat, surrogates
from qjax.quantizer import relaxed_quant
from tests.bad_input.table import Documented, Raises, case

S = surrogates
X = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(16, 4)
SIGN = ("ste", "clipped_ste", "approx_sign", "swish_sign", "reste", "biper")
RESTE_Q = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")
DOC = "qjax/surrogates.py module docstring: a traced out-of-range hyperparameter gives a NaN input gradient"


def _traced_grad(fn, name, value):
    """The input gradient of ``sum(fn(x, **{name: value}))`` with ``value`` traced under jit."""
    return jax.jit(jax.grad(lambda x, v: jnp.sum(fn(x, **{name: v}))))(X, jnp.float32(value))


def _all_nan(g):
    assert g.shape == X.shape and bool(jnp.all(jnp.isnan(g))), g


def _finite_nonzero(g):
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0)), g


def _plus_minus_one(dtype, shape):
    def check(y):
        assert y.dtype == dtype and y.shape == shape, (y.dtype, y.shape)
        assert bool(jnp.all(jnp.abs(y.astype(jnp.float32)) == 1)), y
    return check


def _nnx_hparams(**values):
    from qjax.nnx import Hyperparams

    return Hyperparams(**values)


def _reste_grad_at_o(o):
    return jax.grad(lambda x: jnp.sum(S.reste(x, o=o)))(X)


CASES = [
    # --- migrated from tests/test_bad_input.py ------------------------------------------------------
    case("quantizers-reste-o-nan", lambda: S.reste(X, o=float("nan")), Raises(r"o=nan must be finite")),
    case("quantizers-reste-t-inf", lambda: S.reste(X, t=float("inf")), Raises(r"t=inf must be finite")),
    case("quantizers-biper-omega-minus-inf", lambda: S.biper(X, omega=float("-inf")),
         Raises(r"omega=-inf must be finite")),
    case("quantizers-fake-quant-reste-o-nan",
         lambda: fake_quant(Quantizer("binary", surrogate="reste"), X, o=float("nan")),
         Raises(r"o=nan must be finite")),
    case("quantizers-reste-o-numpy-float32-nan", lambda: S.reste(X, o=np.float32("nan")),
         Raises(r"o=.*nan.* must be finite")),
    case("quantizers-lsq-bits-9", lambda: S.lsq(X, 1.0, bits=9), Raises(r"'int9'.*allowed: .*int8")),
    # --- concrete hyperparameters out of range (issue 12, point 4) ----------------------------------
    case("quantizers-reste-o-zero", lambda: S.reste(X, o=0.0),
         Raises(r"o=0.0 is out of range; allowed: o > 0")),
    case("quantizers-reste-o-negative", lambda: S.reste(X, o=-1.0),
         Raises(r"o=-1.0 is out of range; allowed: o > 0")),
    case("quantizers-reste-t-zero", lambda: S.reste(X, t=0.0),
         Raises(r"t=0.0 is out of range; allowed: t > 0")),
    case("quantizers-reste-t-negative", lambda: S.reste(X, t=-1.5),
         Raises(r"t=-1.5 is out of range; allowed: t > 0")),
    case("quantizers-biper-omega-zero", lambda: S.biper(X, omega=0.0),
         Raises(r"omega=0.0 is out of range; allowed: omega > 0")),
    case("quantizers-biper-omega-negative", lambda: S.biper(X, omega=-20.0),
         Raises(r"omega=-20.0 is out of range; allowed: omega > 0")),
    case("quantizers-swish-beta-zero", lambda: S.swish_sign(X, beta=0.0),
         Raises(r"beta=0.0 is out of range; allowed: beta > 0")),
    case("quantizers-swish-beta-negative", lambda: S.swish_sign(X, beta=-5.0),
         Raises(r"beta=-5.0 is out of range; allowed: beta > 0")),
    case("quantizers-swish-beta-nan", lambda: S.swish_sign(X, beta=float("nan")),
         Raises(r"beta=nan must be finite; allowed: real numbers")),
    case("quantizers-swish-beta-array-one-bad", lambda: S.swish_sign(X, beta=np.array([1.0, -1.0])),
         Raises(r"beta=.*-1.* is out of range; allowed: beta > 0")),
    case("quantizers-reste-o-string", lambda: S.reste(X, o="2"),
         Raises(r"o='2' must be a real number; allowed: a float", exc=TypeError)),
    case("quantizers-biper-omega-none", lambda: S.biper(X, omega=None),
         Raises(r"omega=None must be a real number", exc=TypeError)),
    case("quantizers-fake-quant-swish-beta-zero",
         lambda: fake_quant(Quantizer("binary", PerChannel(-1), "mean_abs", "swish_sign"), X, beta=0.0),
         Raises(r"beta=0.0 is out of range; allowed: beta > 0")),
    case("quantizers-fake-quant-biper-omega-zero",
         lambda: fake_quant(Quantizer("binary", PerChannel(-1), "mean_abs", "biper"), X, omega=0.0),
         Raises(r"omega=0.0 is out of range; allowed: omega > 0")),
    case("quantizers-relaxed-quant-biper-omega-negative",
         lambda: relaxed_quant(Quantizer("binary", PerChannel(-1), "mean_abs", "biper"), X, omega=-1.0),
         Raises(r"omega=-1.0 is out of range; allowed: omega > 0")),
    case("quantizers-relaxed-quant-int4", lambda: relaxed_quant(Quantizer("int4"), X),
         Raises(r"relaxed_quant needs a sign quantizer .*got format 'int4'")),
    # --- unknown hyperparameters and surrogate names ------------------------------------------------
    case("quantizers-approx-sign-takes-no-o", lambda: S.APPROX_SIGN(X, o=1.0),
         Raises(r"\['o'\] for surrogate 'approx_sign'; allowed: none")),
    case("quantizers-clipped-ste-takes-no-beta", lambda: S.CLIPPED_STE(X, beta=1.0),
         Raises(r"\['beta'\] for surrogate 'clipped_ste'; allowed: none")),
    case("quantizers-reste-record-omega", lambda: S.RESTE(X, omega=1.0),
         Raises(r"\['omega'\] for surrogate 'reste'; allowed: \['o', 't'\]")),
    case("quantizers-fake-quant-swish-o", lambda: fake_quant(Quantizer("binary", surrogate="swish_sign"), X,
                                                             o=2.0),
         Raises(r"\['o'\] for surrogate 'swish_sign' on 'binary'; allowed: \['beta'\]")),
    case("quantizers-get-surrogate-foo", lambda: S.get_surrogate("foo"),
         Raises(r"unknown surrogate 'foo'; allowed: ste, clipped_ste, approx_sign, swish_sign, reste, "
                r"biper")),
    case("quantizers-get-surrogate-none", lambda: S.get_surrogate(None),
         Raises(r"unknown surrogate None; allowed: ste")),
    case("quantizers-lsq-bits-1", lambda: S.lsq(X, 1.0, bits=1), Raises(r"'int1'.*'binary' for 1 bit")),
    # --- QAT hyperparameters (qat.check_hparams; NNX Hyperparams and Linen apply call it) -----------
    case("quantizers-check-hparams-o-nan", lambda: qat.check_hparams({"o": float("nan")}),
         Raises(r"o=nan must be finite")),
    case("quantizers-check-hparams-o-zero", lambda: qat.check_hparams({"o": 0.0}),
         Raises(r"o=0.0 is out of range; allowed: o > 0")),
    case("quantizers-check-hparams-omega-negative", lambda: qat.check_hparams({"omega": -20.0}),
         Raises(r"omega=-20.0 is out of range; allowed: omega > 0")),
    case("quantizers-check-hparams-enabled-nan", lambda: qat.check_hparams({"enabled": float("nan")}),
         Raises(r"enabled=nan must be finite")),
    case("quantizers-check-hparams-unknown", lambda: qat.check_hparams({"temperature": 1.0}),
         Raises(r"\['temperature'\]; allowed: o, t, omega, beta, enabled, biper_binarize")),
    case("quantizers-nnx-hyperparams-set-o-nan", lambda: _nnx_hparams(o=1.0).set(o=float("nan")),
         Raises(r"o=nan must be finite")),
    case("quantizers-nnx-hyperparams-set-o-negative", lambda: _nnx_hparams(o=1.0).set(o=-2.0),
         Raises(r"o=-2.0 is out of range; allowed: o > 0")),
    case("quantizers-nnx-hyperparams-init-beta-zero", lambda: _nnx_hparams(beta=0.0),
         Raises(r"beta=0.0 is out of range; allowed: beta > 0")),
    # --- traced out-of-range values: NaN input gradient, forward unchanged (documented) -------------
    case("quantizers-traced-reste-o-zero-nan-grad", lambda: _traced_grad(S.reste, "o", 0.0),
         Documented(_all_nan, doc=DOC)),
    case("quantizers-traced-reste-o-negative-nan-grad", lambda: _traced_grad(S.reste, "o", -1.0),
         Documented(_all_nan, doc=DOC)),
    case("quantizers-traced-reste-t-zero-nan-grad", lambda: _traced_grad(S.reste, "t", 0.0),
         Documented(_all_nan, doc=DOC)),
    case("quantizers-traced-biper-omega-zero-nan-grad", lambda: _traced_grad(S.biper, "omega", 0.0),
         Documented(_all_nan, doc=DOC)),
    case("quantizers-traced-swish-beta-zero-nan-grad", lambda: _traced_grad(S.swish_sign, "beta", 0.0),
         Documented(_all_nan, doc=DOC)),
    case("quantizers-traced-swish-beta-negative-nan-grad",
         lambda: _traced_grad(S.swish_sign, "beta", -5.0), Documented(_all_nan, doc=DOC)),
    case("quantizers-traced-reste-o-nan-nan-grad", lambda: _traced_grad(S.reste, "o", float("nan")),
         Documented(_all_nan, doc=DOC)),
    case("quantizers-traced-fake-quant-reste-o-zero-nan-grad",
         lambda: _traced_grad(lambda x, o: fake_quant(RESTE_Q, x, o=o), "o", 0.0),
         Documented(_all_nan, doc=DOC)),
    case("quantizers-traced-relaxed-biper-omega-zero-nan-grad",
         lambda: _traced_grad(lambda x, omega: relaxed_quant(
             Quantizer("binary", PerChannel(-1), "mean_abs", "biper"), x, omega=omega), "omega", 0.0),
         Documented(_all_nan, doc="Surrogate.real_forward: a traced out-of-range omega gives NaN gradients")),
    case("quantizers-traced-biper-omega-negative-forward-unchanged",
         lambda: jax.jit(lambda w, omega: S.biper(w, omega))(jnp.ones(3), jnp.float32(-1.0)),
         Documented(lambda y: np.testing.assert_array_equal(y, -1.0),
                    doc="the forward sign(sin(omega w)) is computed as given: sign(sin(-1)) = -1")),
    case("quantizers-traced-reste-o-in-range-grad-finite", lambda: _traced_grad(S.reste, "o", 2.0),
         Documented(_finite_nonzero, doc="an in-range traced o is not guarded: the ReSTE gradient")),
    case("quantizers-traced-reste-o-equals-eager", lambda: _traced_grad(S.reste, "o", 3.0),
         Documented(lambda g: np.testing.assert_allclose(g, _reste_grad_at_o(3.0), rtol=1e-6),
                    doc="traced and concrete o give the same ReSTE gradient")),
    # --- documented edges of the sign surrogates -----------------------------------------------------
    *(case(f"quantizers-{name}-zero-gives-plus-one", lambda name=name: S.SURROGATES[name](jnp.zeros(4)),
           Documented(lambda y: np.testing.assert_array_equal(y, 1.0),
                      doc="surrogates.binary_sign: sign(0) = +1, codes are +-1, never 0"))
      for name in SIGN),
    *(case(f"quantizers-{name}-bfloat16-keeps-dtype",
           lambda name=name: S.SURROGATES[name](X.astype(jnp.bfloat16)),
           Documented(_plus_minus_one(jnp.bfloat16, X.shape), doc="surrogates: +-1 in x's dtype"))
      for name in ("ste", "reste", "biper")),
    case("quantizers-swish-float16-keeps-dtype", lambda: S.swish_sign(X.astype(jnp.float16)),
         Documented(_plus_minus_one(jnp.float16, X.shape), doc="surrogates: +-1 in x's dtype")),
    case("quantizers-reste-empty", lambda: S.reste(jnp.zeros((0, 4))),
         Documented(_plus_minus_one(jnp.float32, (0, 4)), doc="an empty input gives an empty output")),
    case("quantizers-biper-scalar", lambda: S.biper(jnp.float32(0.01)),
         Documented(_plus_minus_one(jnp.float32, ()), doc="a 0-d input gives a 0-d +-1")),
    case("quantizers-ste-nan-gradient-is-nan-free-forward",
         lambda: (S.ste(jnp.array([jnp.nan, 1.0])), jax.grad(lambda x: jnp.sum(S.clipped_ste(x) * x))(
             jnp.array([jnp.nan, 0.5]))),
         Documented(lambda r: (np.testing.assert_array_equal(r[0], [1.0, 1.0]),
                               np.testing.assert_array_equal(np.isnan(r[1]), [True, False])),
                    doc="binary_sign: NaN gives +1 in the bare surrogate (fake_quant marks the group NaN "
                        "through its scale); the NaN reaches the gradient")),
]
