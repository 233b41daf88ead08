"""Backend dispatch and input checks of packed_matmul: bad input fails early and names what is allowed."""

import warnings

import jax
import jax.numpy as jnp
import pytest

import kernels_pallas as kp
from kernels_pallas import backends, layout

W4 = layout.pack(jnp.ones((64, 8), jnp.int8), 4, 0)  # (8, 8) uint32
S = jnp.ones((1, 8))
X = jnp.ones((2, 64))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback is what a CPU does")
def test_auto_falls_back_to_xla_on_cpu_and_says_so_once():
    backends._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("auto") == "xla"
        y = kp.packed_matmul(X, W4, S, bits=4)
        kp.packed_matmul(X, W4, S, bits=4)
    fallbacks = [w for w in caught if issubclass(w.category, kp.KernelFallbackWarning)]
    assert len(fallbacks) == 1 and "'cpu'" in str(fallbacks[0].message)
    assert (y == kp.packed_matmul(X, W4, S, bits=4, backend="xla")).all()
    with pytest.raises(ValueError, match="backend='pallas' needs a TPU or GPU, this platform is 'cpu'"):
        kp.packed_matmul(X, W4, S, bits=4, backend="pallas")


def test_resolve_on_each_platform(monkeypatch):
    for name, auto in (("tpu", "pallas"), ("cuda", "pallas"), ("rocm", "pallas")):
        monkeypatch.setattr(jax, "default_backend", lambda name=name: name)
        assert backends.resolve("auto") == auto and backends.resolve("pallas") == "pallas"
        assert backends.kernel_options("pallas")["k_in_grid"] == (name == "tpu")
    assert backends.resolve("interpret") == "interpret"
    assert backends.kernel_options("interpret") == {"interpret": True, "k_in_grid": True}


@pytest.mark.parametrize("kwargs,match", [
    ({"backend": "mosaic"}, "unknown backend 'mosaic'; allowed: auto, xla, pallas, interpret"),
    ({"bits": 3}, r"bits=3 has no packed matmul; allowed: \(1, 2, 4, 8\)"),
    ({"bits": True}, r"bits=True has no packed matmul"),
    ({"bits": 2}, r"does not hold K=64 2-bit codes; allowed: uint32 \(4, N\)"),
    ({"w_packed": W4.astype(jnp.int32)}, "dtype int32 does not hold"),
    ({"scales": jnp.ones((8,))}, r"scales of shape \(8,\) do not fit K=64, N=8"),
    ({"scales": jnp.ones((3, 8))}, r"scales of shape \(3, 8\) do not fit K=64"),
    ({"scales": jnp.ones((4, 8)), "group_size": 32}, "with group_size=32; allowed"),
    ({"zero_point": jnp.ones((2, 8))}, r"zero_point of shape \(2, 8\); allowed: None or the scales' shape"),
    ({"x": jnp.ones((2, 64), jnp.int32)}, "dtype int32: allowed a float array"),
    ({"x": jnp.ones((2, 56))}, r"K=56 4-bit codes; allowed: uint32 \(7, N\)"),
])
def test_bad_input_names_the_value_and_the_allowed_ones(kwargs, match):
    args = {"x": X, "w_packed": W4, "scales": S, "bits": 4, "backend": "xla", **kwargs}
    with pytest.raises(ValueError, match=match):
        kp.packed_matmul(args.pop("x"), args.pop("w_packed"), args.pop("scales"), **args)
