"""Op-level interception is scoped to the intercepting thread and block: another thread, running JAX's
contractions at the same moment, gets plain results, and the original functions come back afterwards."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.lax import lax as lax_internal

from qjax import interception

A = jax.random.normal(jax.random.key(0), (4, 8))
B = jax.random.normal(jax.random.key(1), (8, 3))


def contractions():
    dims = (((1,), (0,)), ((), ()))
    return {"einsum": jnp.einsum("ij,jk->ik", A, B), "dot_general": jax.lax.dot_general(A, B, dims),
            "dot": jnp.dot(A, B), "matmul": jnp.matmul(A, B), "tensordot": jnp.tensordot(A, B, 1),
            "at": A @ B}


def doubling(op, original, args, kwargs):
    calls.append(op)
    return 2 * original(*args, **kwargs)


calls: list = []


def test_other_threads_see_the_original_functions_while_one_intercepts():
    plain = contractions()
    code = lax_internal.dot_general.__code__
    inside, done = threading.Event(), threading.Event()
    seen: dict = {}

    def other():
        inside.wait(10)
        seen.update(contractions())  # while the main thread is inside its block
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with interception.intercepting(doubling):
        assert lax_internal.dot_general.__code__ is not code  # the trampolines are in
        inside.set()
        assert done.wait(10)
        mine = contractions()
    t.join()
    for op, value in plain.items():
        np.testing.assert_array_equal(seen[op], value)  # the other thread: untouched
    for op in ("einsum", "dot_general", "dot", "matmul", "tensordot"):
        np.testing.assert_allclose(mine[op], 2 * plain[op], rtol=1e-6)  # this thread: intercepted once
    np.testing.assert_array_equal(mine["at"], plain["at"])  # `@` cannot be intercepted (module docstring)
    assert lax_internal.dot_general.__code__ is code and jnp.dot is interception.original("dot")
    np.testing.assert_array_equal(contractions()["einsum"], plain["einsum"])


def test_blocks_nest_and_a_shield_runs_plain():
    calls.clear()
    with interception.intercepting(doubling):
        with interception.intercepting(None):
            np.testing.assert_array_equal(jnp.einsum("ij,jk->ik", A, B), jnp.einsum("ij,jk->ik", A, B))
        assert calls == []
        y = jnp.einsum("ij,jk->ik", A, B)
    assert calls == ["einsum"]  # einsum's own inner dot_general is not intercepted again
    np.testing.assert_allclose(y, 2 * (A @ B), rtol=1e-6)


def test_library_jits_keep_their_own_cache():
    with interception.intercepting(doubling):
        inside = jnp.matmul(A, B)  # intercepted at the attribute, not inside jnp.matmul's own jit
    np.testing.assert_allclose(inside, 2 * (A @ B), rtol=1e-6)
    np.testing.assert_array_equal(jnp.matmul(A, B), A @ B)  # jnp.matmul's compiled cache is not poisoned
