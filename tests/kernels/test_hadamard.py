"""kernels_pallas.hadamard_transform: the FWHT kernel (interpret mode) = the reference = x H / sqrt(n)."""

import functools
import math
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import kernels_pallas as kp
from kernels_pallas import backends
from kernels_pallas.hadamard import hadamard_transform_pallas


def dense(x, n):
    """``x H_n / sqrt(n)`` with scipy's Sylvester matrix, in float64."""
    return np.asarray(x, np.float64) @ (scipy.linalg.hadamard(n) / math.sqrt(n))


@pytest.mark.parametrize("n,rows", [(1, 3), (2, 1), (8, 17), (64, 5), (256, 9), (4096, 2)])
def test_kernel_and_reference_equal_the_dense_product(n, rows):
    x = jnp.asarray(np.random.default_rng(n).standard_normal((rows, n)), jnp.float32)
    want = dense(x, n)
    kernel = kp.hadamard_transform(x, backend="interpret")
    reference = kp.hadamard_transform(x, backend="xla")
    assert kernel.dtype == reference.dtype == jnp.float32 and kernel.shape == x.shape
    np.testing.assert_allclose(kernel, want, atol=1e-5)
    np.testing.assert_allclose(reference, want, atol=1e-5)
    np.testing.assert_allclose(kernel, reference, atol=1e-5)


def test_several_row_blocks_with_padding_and_leading_axes():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7, 32)), jnp.float32)
    y = hadamard_transform_pallas(x, interpret=True, block_elements=8 * 32)  # 8-row blocks: 3 blocks, padded
    np.testing.assert_allclose(y, dense(x, 32), atol=1e-5)


def test_self_inverse_and_orthogonal():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 128)), jnp.float32)
    for backend in ("xla", "interpret"):
        y = kp.hadamard_transform(x, backend=backend)
        np.testing.assert_allclose(kp.hadamard_transform(y, backend=backend), x, atol=1e-5)
        np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_jit_vmap_and_grad():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    want = dense(x, 16)
    for backend in ("xla", "interpret"):
        f = jax.jit(functools.partial(kp.hadamard_transform, backend=backend))
        np.testing.assert_allclose(f(x), want, atol=1e-5)
        np.testing.assert_allclose(jax.vmap(f)(x), want, atol=1e-5)
        np.testing.assert_allclose(jax.vmap(f, in_axes=1, out_axes=1)(x), want, atol=1e-5)
        # linear and symmetric: d/dx sum(c * x H / sqrt(n)) = c H / sqrt(n)
        g = jax.jit(jax.grad(lambda x, f=f: jnp.sum(c * f(x))))(x)
        np.testing.assert_allclose(g, dense(c, 16), atol=1e-5)


def test_bfloat16_in_bfloat16_out():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64)), jnp.bfloat16)
    for backend in ("xla", "interpret"):
        y = kp.hadamard_transform(x, backend=backend)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32), dense(x, 64), atol=0.05)


def test_float64_is_computed_in_float64():
    code = ("import jax; jax.config.update('jax_enable_x64', True)\n"
            "import math, numpy as np, scipy.linalg, kernels_pallas as kp\n"
            "x = np.random.default_rng(0).standard_normal((3, 512))\n"
            "want = x @ scipy.linalg.hadamard(512) / math.sqrt(512)\n"
            "for backend in ('xla', 'interpret'):\n"
            "    y = kp.hadamard_transform(x, backend=backend)\n"
            "    assert y.dtype == np.float64, y.dtype\n"
            "    print(np.abs(np.asarray(y) - want).max())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    errors = [float(v) for v in done.stdout.split()]
    assert len(errors) == 2 and max(errors) < 1e-13, errors


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback is what a CPU does")
def test_auto_is_the_reference_on_cpu():
    x = jnp.ones((2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kp.KernelFallbackWarning)
        y = kp.hadamard_transform(x)
    np.testing.assert_array_equal(y, kp.hadamard_transform(x, backend="xla"))
    with pytest.raises(ValueError, match="backend='pallas' needs a TPU or GPU"):
        kp.hadamard_transform(x, backend="pallas")
    assert backends.compiler_params(1, True, parallel=1) is None


def test_empty_rows_and_nan_stays_in_its_row():
    assert kp.hadamard_transform(jnp.ones((0, 16)), backend="interpret").shape == (0, 16)
    x = jnp.ones((2, 16)).at[0, 3].set(jnp.nan)
    for backend in ("xla", "interpret"):
        y = kp.hadamard_transform(x, backend=backend)
        assert bool(jnp.all(jnp.isnan(y[0]))) and bool(jnp.all(jnp.isfinite(y[1])))


@pytest.mark.parametrize("x,exc,match", [
    (jnp.ones((2, 12)), ValueError, r"last axis of length n=12 .*is not a power of two; allowed: 1, 2, 4, "
                                    r"\.\.\., e\.g\. 8 or 16"),
    (jnp.ones((2, 0)), ValueError, r"n=0 .*not a power of two"),
    (jnp.ones((2, 8), jnp.int32), ValueError, r"x of shape \(2, 8\) and dtype int32; allowed: a float array"),
    (jnp.float32(1.0), ValueError, r"x of shape \(\) and dtype float32; allowed: a float array \(\.\.\."),
    ([1.0, 2.0], TypeError, r"x is a list; allowed: an array"),
])
def test_bad_input_names_the_value_and_what_is_allowed(x, exc, match):
    with pytest.raises(exc, match=match):
        kp.hadamard_transform(x, backend="xla")
    with pytest.raises(ValueError, match="unknown backend 'cuda'; allowed: auto, xla, pallas, interpret"):
        kp.hadamard_transform(jnp.ones((2, 8)), backend="cuda")
