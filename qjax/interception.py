"""Op-level interception of JAX's contractions, scoped to one call and to the calling thread.

While a quantized module runs, the contractions it calls (``jnp.einsum``, ``jnp.tensordot``,
``lax.dot_general``, ``lax.conv_general_dilated``, ``jnp.dot``, ``jnp.matmul``) must reach qjax's core
(:mod:`qjax.core`) instead of JAX, whichever alias the model's code holds: Flax's ``lax.dot_general``,
``nnx.Linear``'s stored ``dot_general`` attribute, a ``from jax.numpy import einsum`` or Tunix's
``jnp.einsum``; and the fused attention op ``jax.nn.dot_product_attention`` (what Flax's attention calls
when it can), whose ``q k^T`` and ``p v`` happen inside. Qwix's ``interception.py`` solved this the same
way, and this module follows its design:

- a plain Python target function (``einsum``, ``tensordot``, ``dot_general``, ``conv_general_dilated``)
  gets a trampoline as its ``__code__`` (so every alias of the function object is reached); a jitted
  target (``jnp.dot``, ``jnp.matmul``: compiled C++ dispatch, no ``__code__``) is reached through its
  ``jax.numpy`` attribute;
- the trampolines exist only while at least one thread is inside :func:`intercepting`; the last thread
  to leave puts the original code back;
- dispatch is per thread: a trampoline called from a thread with no active handler (any other thread, or
  this one outside the block) runs the original function, so nothing changes for the rest of the process;
- the handler is not re-entered: while it runs (and calls JAX itself) every target runs the original.

``x @ w`` reaches ``jnp.matmul``'s compiled dispatch directly and cannot be intercepted; the front ends
quantize such a module's weight where it is stored instead (see :mod:`qjax.core`).
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

Handler = Callable[[str, Callable, tuple, dict], Any]  # (op name, original function, args, kwargs) -> out

OPS = ("einsum", "tensordot", "dot_general", "conv_general_dilated", "dot", "matmul", "dot_product_attention")

_lock = threading.Lock()
_users = 0  # threads inside intercepting(), all together
_originals: dict[str, Callable] = {}  # op -> callable running the original code
_restore: list[Callable[[], None]] = []
_local = threading.local()


def _targets() -> dict[str, tuple[Any, str]]:
    """op -> (object, attribute) to intercept: a function (its ``__code__``) or the ``jax.numpy`` module."""
    import jax.numpy as jnp
    from jax._src.lax import convolution, lax
    from jax._src.nn import functions
    from jax._src.numpy import einsum, tensor_contractions

    return {"einsum": (einsum.einsum, "__code__"), "tensordot": (tensor_contractions.tensordot, "__code__"),
            "dot_general": (lax.dot_general, "__code__"),
            "conv_general_dilated": (convolution.conv_general_dilated, "__code__"),
            "dot": (jnp, "dot"), "matmul": (jnp, "matmul"),
            "dot_product_attention": (functions.dot_product_attention, "__code__")}


def _trampoline_code(op: str, like: types.CodeType) -> types.CodeType:
    source = (f"def {like.co_name}(*args, **kwargs):\n"
              "    from qjax.interception import dispatch\n"
              f"    return dispatch({op!r}, args, kwargs)\n")
    namespace: dict = {}
    exec(compile(source, like.co_filename, "exec"), namespace)
    return namespace[like.co_name].__code__


def _install() -> None:
    for op, (owner, attribute) in _targets().items():
        if attribute == "__code__":
            fn = owner
            if fn.__code__.co_freevars:
                raise RuntimeError(f"qjax cannot intercept {fn.__qualname__}: it is a closure")
            original = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                          fn.__closure__)
            original.__kwdefaults__ = fn.__kwdefaults__
            _originals[op] = original
            code = fn.__code__
            fn.__code__ = _trampoline_code(op, code)
            _restore.append(lambda fn=fn, code=code: setattr(fn, "__code__", code))
        else:
            original = getattr(owner, attribute)
            _originals[op] = original
            setattr(owner, attribute, _attribute_trampoline(op, original))
            _restore.append(lambda o=owner, a=attribute, f=original: setattr(o, a, f))


def _attribute_trampoline(op: str, original: Callable) -> Callable:
    def trampoline(*args, **kwargs):
        return dispatch(op, args, kwargs)

    trampoline.__name__, trampoline.__doc__, trampoline.__wrapped__ = (
        original.__name__, original.__doc__, original)
    return trampoline


def _uninstall() -> None:
    while _restore:
        _restore.pop()()
    _originals.clear()


def dispatch(op: str, args: tuple, kwargs: dict):
    """Called by every trampoline: this thread's innermost handler, else the original function."""
    original = _originals[op]
    stack = getattr(_local, "stack", None)
    if not stack or getattr(_local, "busy", False) or stack[-1] is None:
        return original(*args, **kwargs)
    _local.busy = True
    try:
        return stack[-1](op, original, args, kwargs)
    finally:
        _local.busy = False


def original(op: str) -> Callable:
    """The un-intercepted function for ``op`` (the handler's own calls go there anyway)."""
    return _originals[op] if op in _originals else _targets_callable(op)


def _targets_callable(op: str) -> Callable:
    owner, attribute = _targets()[op]
    return owner if attribute == "__code__" else getattr(owner, attribute)


@contextlib.contextmanager
def intercepting(handler: Handler | None) -> Iterator[None]:
    """Within the block, this thread's contractions go to ``handler(op, original, args, kwargs)``.

    Blocks nest (the innermost handler wins; ``None`` shields a block: contractions inside run plain).
    Other threads are not affected. Not re-entrant from inside the handler itself.
    """
    global _users
    with _lock:
        if _users == 0:
            _install()
        _users += 1
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(handler)
    try:
        yield
    finally:
        stack.pop()
        with _lock:
            _users -= 1
            if _users == 0:
                _uninstall()


def active() -> bool:
    """Whether this thread is inside a handler's block (outside the handler itself)."""
    stack = getattr(_local, "stack", None)
    return bool(stack) and not getattr(_local, "busy", False)
