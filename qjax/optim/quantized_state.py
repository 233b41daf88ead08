"""Block-wise 8-bit optimizer states for any optax GradientTransformation.

``quantize_state(inner)`` returns a transformation whose state is ``inner``'s state with every floating
leaf of at least ``min_size`` elements stored as a :class:`~qjax.QArray`: uint8 codes of the 256-value
dynamic map (:func:`qjax.formats.dynamic_map`) in the leaf's own shape, plus one float32 absmax per block of
``block_size`` consecutive elements of the flattened leaf (:class:`~qjax.PerBlock`). Each update, per block
``b`` (Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", ICLR 2022)::

    s_b   = decode(c_b) * a_b                      dequantize (code value times block absmax)
    s_b'  = inner.update(g, s)                     the normal 32-bit update
    a_b'  = max_i |s_b'[i]|                        new absmax after the update
    c_b'  = argmin_k |T[k] - s_b' / a_b'|          nearest code of the map T (both neighbours compared)

Which map: the unsigned map for second-moment leaves, the signed map for all others. A leaf is a second
moment when its key path holds a state field named in ``second_moment_fields`` (default
:data:`SECOND_MOMENT_FIELDS`: optax's ``nu`` of Adam/AdamW/AMSGrad/RMSprop/..., AdaGrad's
``sum_of_squares``, ...). A nonzero second moment never decodes to 0: it is rounded up to the smallest
positive code, since ``m / (sqrt(v) + eps)`` explodes for ``v = 0``.

Non-finite gradients (``skip_nonfinite=True``): a NaN or Inf gradient element is replaced by 0 before the
inner update, and afterwards that element's state is set back to its previous value and its update to 0,
so its parameter and state are unchanged and no block absmax becomes NaN. The same holds for a finite
gradient element whose square overflows its dtype (``|g| > sqrt(max)``, 1.8e19 in float32: ``g = 1e20``
would make Adam's ``nu`` inf and its block's absmax NaN): it is skipped (update 0, as 32-bit optax's
``m / sqrt(inf) = 0``; its state is kept, where optax's ``nu`` stays inf and the element never moves
again), and the rest of its block steps as usual. A huge gradient
whose state stays finite is stored as it is: it sets its block's absmax, and the block's small entries
round to the map's smallest codes (the block-wise format's quantization error, as in bitsandbytes). A
state leaf is matched to its gradient leaf by the longest key-path suffix of equal shape
(``mu['dense']['kernel']`` -> ``['dense']['kernel']``). A block all of whose gradients are skipped keeps
its codes and absmax bit for bit (re-encoding an unchanged block would move it by the map's asymmetry,
-0.99297 vs 1.0).

Speed (XLA on CPU): codes are found arithmetically (:meth:`qjax.formats.Format.encode` of the dynamic
maps), the block maxima of all leaves of one parameter and the "any finite gradient" flags come from one
variadic reduction, and the step is traced three times behind an optimization barrier (for the codes, the
maxima and the updates) so that no full-size float32 temporary is written: each pass re-reads the uint8
codes and the gradient and recomputes the dequantized state in registers.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from qjax.formats import get_format
from qjax.granularity import PerBlock
from qjax.qarray import QArray, dequantize
from qjax.scales import TINY

SIGNED = "dynamic"
UNSIGNED = "dynamic_unsigned"
FLOAT32 = "float32"
STATE_FORMATS = (SIGNED, UNSIGNED, FLOAT32)

SECOND_MOMENT_FIELDS = (
    "nu",
    "nu_max",
    "sum_of_squares",
    "grad_sum_of_squares",
    "e_g",
    "e_x",
    "n",
    "v_row",
    "v_col",
)
"""optax state fields holding non-negative second moments (Adam-family ``nu``, AMSGrad ``nu_max``, AdaGrad
``sum_of_squares``, DoG ``grad_sum_of_squares``, AdaDelta ``e_g``/``e_x``, Adan ``n``, Adafactor's
factored ``v_row``/``v_col``). Adafactor's unfactored ``v`` is not listed, since Adan's ``v`` is signed:
give it an override."""

PARAMETER_COPY_FIELDS = ("z", "params", "init_params")
"""optax state fields holding copies of the parameters (schedule-free ``z``, L-BFGS ``params``, DoG
``init_params``): kept 32-bit, since 8-bit parameters would lose the training itself."""

STABLE_EMBEDDING_PATTERN = r"(^|/)stable_embedding(/|$)"
"""Paths of :class:`qjax.optim.StableEmbedding` tables; their state stays 32-bit (the paper's advice)."""

Override = tuple["str | re.Pattern", str]


def path_str(path: tuple) -> str:
    """A key path as ``"/"``-joined names.

    ``(SequenceKey(0), GetAttrKey('mu'), DictKey('w'))`` -> ``"0/mu/w"``.
    """
    names = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def _is_qarray(x) -> bool:
    return isinstance(x, QArray)


def _check_overrides(overrides) -> tuple[tuple[re.Pattern, str], ...]:
    pairs = overrides.items() if isinstance(overrides, Mapping) else overrides
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence | type({}.items())):
        raise ValueError(
            f"overrides={overrides!r} must be a mapping {{path regex: format}} or a sequence "
            "of (path regex, format) pairs"
        )
    checked = []
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"override {pair!r} is not a (path regex, format) pair")
        pattern, fmt = pair
        if isinstance(pattern, str):
            try:
                pattern = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"override path regex {pattern!r} is invalid ({err})") from None
        elif not isinstance(pattern, re.Pattern):
            raise ValueError(
                f"override path pattern {pattern!r} has type {type(pattern).__name__}; "
                "allowed: str (a regex) or re.Pattern"
            )
        if fmt not in STATE_FORMATS:
            raise ValueError(
                f"override format {fmt!r} for {pattern.pattern!r} is unknown; allowed: "
                f"{', '.join(STATE_FORMATS)}"
            )
        checked.append((pattern, fmt))
    return tuple(checked)


def _check_int(name: str, value, lowest: int, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= {lowest}{hint}")


def leaf_format(
    path: tuple,
    leaf,
    min_size: int,
    overrides: Sequence[tuple[re.Pattern, str]],
    second_moment_fields: Sequence[str],
) -> str:
    """The storage of one state leaf: ``"dynamic"``, ``"dynamic_unsigned"`` or ``"float32"`` (kept as is).

    Rule, in order: a non-floating leaf (counts, keys) or one under ``min_size`` elements stays as it is;
    the first override whose regex ``re.search``-es the ``"/"``-joined path decides; a stable embedding's
    state and a parameter copy (a field in :data:`PARAMETER_COPY_FIELDS`) stay 32-bit; a leaf under a field
    in ``second_moment_fields`` gets the unsigned map; any other the signed map. Depends only on path, shape
    and dtype (never on sharding or values).
    """
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or leaf.size < min_size:
        return FLOAT32
    name = path_str(path)
    for pattern, fmt in (*overrides, (re.compile(STABLE_EMBEDDING_PATTERN), FLOAT32)):
        if pattern.search(name):
            return fmt
    fields = {key.name for key in path if isinstance(key, jax.tree_util.GetAttrKey)}
    if fields & set(PARAMETER_COPY_FIELDS):
        return FLOAT32
    return UNSIGNED if fields & set(second_moment_fields) else SIGNED


def encode_state(x: jax.Array, fmt: str, block_size: int) -> QArray:
    """Block-wise 8-bit codes of a state leaf: nearest code of the dynamic map per block absmax.

    ``a_b = max|x_b|``, ``c = argmin_k |T[k] - x / a_b|`` (the same codes and scales as :func:`qjax.quantize`
    with ``Quantizer(fmt, PerBlock(block_size))``); with the unsigned map a positive ``x`` whose nearest code
    is 0 gets the smallest positive code instead (Dettmers et al., ICLR 2022; see the module docstring).
    """
    if fmt not in (SIGNED, UNSIGNED):
        raise ValueError(f"encode_state: format {fmt!r} is not allowed; allowed: {SIGNED}, {UNSIGNED}")
    _check_int("block_size", block_size, 1)
    gran, dtype = PerBlock(block_size), x.dtype.name
    x = x.astype(jnp.float32)
    (top,), _ = _block_maxima([x], None, gran)
    return _encode_leaf(x, fmt, gran, top, dtype=dtype)


def _block_maxima(
    xs: Sequence[jax.Array], finite: jax.Array | None, gran: PerBlock
) -> tuple[list[jax.Array], jax.Array | None]:
    """Per block of ``gran``: ``max_i key(x[i])`` of each ``x`` (all of one shape) and ``any_i finite[i]``.

    ``key(v) = |v|`` for finite ``v`` and ``+inf`` otherwise, so the maximum is the block absmax, ``+inf``
    exactly when the block holds a NaN or Inf. One variadic reduction over all the arrays: XLA fuses the
    arrays' producers (dequantize and the inner update) into it instead of writing them out.
    """
    keys = [jnp.where(jnp.isfinite(xb), jnp.abs(xb), jnp.inf) for xb in map(gran.to_blocks, xs)]
    inits = [jnp.float32(-jnp.inf)] * len(keys)
    if finite is not None:
        keys.append(gran.to_blocks(finite).astype(jnp.float32))
        inits.append(jnp.float32(0))
    out = jax.lax.reduce(
        tuple(keys),
        tuple(inits),
        lambda a, b: tuple(jnp.maximum(u, v) for u, v in zip(a, b, strict=True)),
        (1,),
    )
    out = [o[:, None] for o in out]
    return (out[:-1], out[-1] > 0) if finite is not None else (out, None)


def _round_up_nonzero(codes: jax.Array, x: jax.Array) -> jax.Array:
    """Unsigned map: a positive ``x`` whose nearest code is 0 takes code 1 (the smallest positive value),
    since ``m / (sqrt(v) + eps)`` explodes for a second moment ``v`` that decodes to 0."""
    return jnp.where((codes == 0) & (x > 0), jnp.uint8(1), codes)


def _encode_leaf(
    x: jax.Array,
    fmt: str,
    gran: PerBlock,
    top: jax.Array,
    live: jax.Array | None = None,
    old: QArray | None = None,
    dtype: str = "float32",
) -> QArray:
    """Codes and absmaxes of ``x`` from its block maxima ``top`` (see :func:`_block_maxima`).

    ``s_b = max(top_b, tiny)``, NaN where ``top_b = inf`` (a NaN or Inf in the block): the scale of
    ``qjax.quantize``'s absmax rule, the dynamic maps having ``max_abs = 1``. ``c = encode(x / s_b)``
    elementwise in ``x``'s shape, so that the codes keep ``x``'s sharding. Blocks where ``live`` is false
    keep ``old``'s codes and absmax bit for bit. ``dtype`` is the leaf's own dtype (what dequantize gives).
    """
    scale = jnp.where(top == jnp.inf, jnp.nan, jnp.maximum(top, TINY))
    if live is not None:
        scale = jnp.where(live, scale, old.scale)
    def per_element(per_block):
        return gran.from_blocks(jnp.broadcast_to(per_block, (scale.shape[0], gran.size)), x.shape)

    codes = get_format(fmt).encode(x / per_element(scale))
    if fmt == UNSIGNED:
        codes = _round_up_nonzero(codes, x)
    if live is not None:
        codes = jnp.where(per_element(live), codes, old.codes)
    return QArray(codes, scale, None, fmt, gran, dtype)


def _requantize(
    stored: Sequence,
    after: Sequence[jax.Array],
    finite: Sequence[jax.Array | None],
    after_for_maxima: Sequence[jax.Array] | None = None,
) -> list:
    """New 8-bit leaves for the ``QArray`` s among ``stored`` (others pass ``after`` through).

    Leaves of one shape and block size that share a gradient (``mu`` and ``nu`` of one parameter) get
    their block maxima and the gradient's "any finite" flags from one reduction; a block with no finite
    gradient keeps its codes and absmax (see the module docstring). The maxima are taken over
    ``after_for_maxima`` (the same values computed separately, see ``update_fn``; ``finite`` are the masks
    that trace made) when given.
    """
    if after_for_maxima is None:
        after_for_maxima = after
    out = list(after)
    groups: dict = {}
    for i, (node, x, ok) in enumerate(zip(stored, after, finite, strict=True)):
        if _is_qarray(node):
            groups.setdefault((id(ok), x.shape, node.granularity.size), []).append(i)
    for (_, _, size), idx in groups.items():
        gran, ok = PerBlock(size), finite[idx[0]]
        tops, live = _block_maxima([after_for_maxima[i].astype(jnp.float32) for i in idx], ok, gran)
        for i, top in zip(idx, tops, strict=True):
            old = stored[i] if ok is not None else None
            x = after[i].astype(jnp.float32)
            out[i] = _encode_leaf(x, stored[i].format, gran, top, live, old, after[i].dtype.name)
    return out


def match_params(state_leaves: Sequence[tuple[tuple, tuple[int, ...]]], tree) -> list:
    """For each state leaf ``(key path, shape)``, the leaf of ``tree`` (gradients or params) whose key path
    is the longest suffix of the state leaf's path and whose shape is the same, or ``None``.

    ``0/mu/params/dense/kernel`` matches ``params/dense/kernel``; leaves of ``tree`` need a ``shape``.
    """
    leaves = {tuple(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    found = []
    for path, shape in state_leaves:
        path = tuple(path)
        found.append(
            next(
                (
                    leaves[path[i:]]
                    for i in range(len(path) + 1)
                    if path[i:] in leaves and jnp.shape(leaves[path[i:]]) == tuple(shape)
                ),
                None,
            )
        )
    return found


def _steppable(g: jax.Array) -> jax.Array:
    """Gradient elements the wrapper steps on: ``|g| <= sqrt(max)`` of ``g``'s dtype, i.e. finite with a
    finite square (``g^2`` of ``g = 1e20`` is inf in float32, which would make Adam's ``nu`` inf). The rest
    are skipped (module docstring)."""
    dtype = jnp.result_type(g)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return jnp.ones(jnp.shape(g), bool)
    return jnp.abs(g) <= float(jnp.finfo(dtype).max) ** 0.5


def quantize_state(
    inner: optax.GradientTransformation,
    block_size: int = 256,
    min_size: int = 4096,
    *,
    overrides: Mapping | Sequence[Override] = (),
    second_moment_fields: Sequence[str] = SECOND_MOMENT_FIELDS,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Wrap any optax transformation so that its large state leaves are block-wise 8-bit.

    Per block of ``block_size`` elements: dequantize ``s = T[c] * a``, run ``inner``'s 32-bit update, take the
    new absmax ``a' = max|s'|`` and requantize to the nearest code ``c' = argmin_k |T[k] - s'/a'|`` of the
    dynamic map ``T`` (unsigned for second moments, signed otherwise), as in Dettmers et al., "8-bit
    Optimizers via Block-wise Quantization", ICLR 2022. State memory: 1 byte per element plus 4 bytes per
    block (2.03 bytes per parameter for Adam with blocks of 256, against 8 in float32).

    Args:
      inner: any ``optax.GradientTransformation`` (a chain, ``inject_hyperparams``, ``masked``, ...).
      block_size: elements per absmax (256 as in bitsandbytes; the paper used 2048).
      min_size: leaves with fewer elements keep their 32-bit state (4096 as in bitsandbytes).
      overrides: ``{path regex: format}`` or ``[(path regex, format), ...]``; the first regex that
        ``re.search``-es a state leaf's ``"/"``-joined key path (e.g. ``"0/mu/params/embed/embedding"``)
        decides its format: ``"float32"`` (keep 32-bit), ``"dynamic"`` (signed map) or
        ``"dynamic_unsigned"``. A pattern that matches no leaf is reported with a warning at ``init``.
      second_moment_fields: state field names whose leaves get the unsigned map.
      skip_nonfinite: a NaN/Inf gradient element, or one whose square overflows (``|g| > 1.8e19`` in
        float32), leaves its state and parameter unchanged (module docstring). ``False``: no masking, so a
        non-finite state makes its block's absmax NaN (the whole block decodes to NaN).

    Returns:
      A ``GradientTransformationExtraArgs`` whose state has ``inner``'s structure, with :class:`QArray` nodes
      in place of the quantized leaves. Works under ``jit``, sharding and Orbax like any optax state.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"quantize_state expects an optax GradientTransformation, got {type(inner).__name__}"
        )
    _check_int("block_size", block_size, 1, " (256 as in bitsandbytes, 2048 as in the paper)")
    _check_int("min_size", min_size, 0, " (leaves with fewer elements keep 32-bit state)")
    rules = _check_overrides(overrides)
    if isinstance(second_moment_fields, str) or not all(isinstance(f, str) for f in second_moment_fields):
        raise ValueError(f"second_moment_fields={second_moment_fields!r} must be a sequence of field names")
    fields = tuple(second_moment_fields)
    inner = optax.with_extra_args_support(inner)

    def formats(state) -> list[tuple[tuple, object, str]]:
        """``(key path, leaf, storage)`` of every leaf of a 32-bit ``inner`` state."""
        return [(path, leaf, leaf_format(path, leaf, min_size, rules, fields))
                for path, leaf in jax.tree_util.tree_leaves_with_path(state)]

    def check_state(state, updates) -> None:
        """``state`` must have the layout ``init`` gives for parameters shaped like ``updates`` (a state of
        32-bit optax, of another optimizer or of other parameters is refused; checked at trace time)."""
        given, given_def = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_qarray)
        expected = jax.eval_shape(inner.init, updates)
        same = given_def == jax.tree_util.tree_structure(expected)
        wrong = None if same else "its tree structure is not the one init gives"
        for (path, node), (_, leaf, fmt) in zip(given, formats(expected), strict=True) if same else ():
            got = (node.format, node.codes.shape) if _is_qarray(node) else (FLOAT32, jnp.shape(node))
            if wrong is None and got != (fmt, leaf.shape):
                wrong = f"{path_str(path)!r} holds {got[0]} {got[1]}, expected {fmt} {leaf.shape}"
        if wrong is not None:
            raise ValueError(f"quantize_state: the state was not made by this optimizer's init ({wrong}); "
                             "allowed: the state that this optimizer's init(params) returned, for params "
                             "shaped like the gradients")

    def init_fn(params):
        state = inner.init(params)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        found = match_params([(p, jnp.shape(x)) for p, x in leaves], params)
        for (path, leaf), param in zip(leaves, found, strict=True):
            if param is not None and not any(jnp.issubdtype(jnp.result_type(x), jnp.inexact)
                                             for x in (leaf, param)):
                raise TypeError(f"quantize_state: params leaf behind state {path_str(path)!r} has dtype "
                                f"{jnp.result_type(param)}; allowed: floating parameters (keep integer "
                                "buffers out of the params, or mask them with optax.masked)")
        stored = []
        for _, leaf, fmt in formats(state):
            # The barrier keeps XLA from constant-folding the encoding of optax's zeros under jit (slow).
            stored.append(
                leaf if fmt == FLOAT32 else encode_state(jax.lax.optimization_barrier(leaf), fmt, block_size)
            )
        names = [path_str(path) for path, _ in leaves]
        for pattern, _ in rules:
            if not any(pattern.search(name) for name in names):
                warnings.warn(
                    f"quantize_state: override {pattern.pattern!r} matched no state leaf; "
                    f"the state's paths are {names}",
                    stacklevel=2,
                )
        return treedef.unflatten(stored)

    def inner_step(updates, state, params, extra_args):
        """The 32-bit step on the dequantized state: ``(updates, new state leaves, masks, grad_ok)``, with
        gradient elements that are not :func:`_steppable` keeping their state (``s' = where(ok, s', s)``)."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_qarray)
        old = [dequantize(x) if _is_qarray(x) else x for _, x in leaves]
        masks, grad_ok = [None] * len(old), None
        if skip_nonfinite:
            grad_ok = jax.tree_util.tree_map(_steppable, updates)
            masks = match_params([(p, jnp.shape(x)) for (p, _), x in zip(leaves, old, strict=True)], grad_ok)
            updates = jax.tree_util.tree_map(lambda g, ok: jnp.where(ok, g, 0), updates, grad_ok)
        new_updates, new_state = inner.update(updates, treedef.unflatten(old), params, **extra_args)
        new = [
            after if ok is None else jnp.where(ok, after, before)
            for before, after, ok in zip(old, treedef.flatten_up_to(new_state), masks, strict=True)
        ]
        return new_updates, new, masks, grad_ok

    def update_fn(updates, state, params=None, **extra_args):
        check_state(state, updates)
        leaves, treedef = jax.tree_util.tree_flatten(state, is_leaf=_is_qarray)
        # Three traces of the same step, on copies of the inputs that XLA cannot identify with each other
        # (an optimization barrier): one feeds the new codes, one the block maxima, one the updates. Each
        # pass then recomputes the dequantized state and the 32-bit step in registers instead of writing
        # full-size float32 temporaries, whose page faults cost more than the arithmetic on CPU. The
        # values are the same in all three.
        for_maxima, for_updates = jax.lax.optimization_barrier(
            ((updates, state, params), (updates, state, params))
        )
        _, new, _, _ = inner_step(updates, state, params, extra_args)
        _, new_for_maxima, masks, _ = inner_step(*for_maxima, extra_args)
        new_updates, _, _, grad_ok = inner_step(*for_updates, extra_args)
        out = _requantize(leaves, new, masks, new_for_maxima)
        if skip_nonfinite:
            new_updates = jax.tree_util.tree_map(lambda u, ok: jnp.where(ok, u, 0), new_updates, grad_ok)
        return new_updates, treedef.unflatten(out)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
