"""Where a smoothing divisor goes: folded into the producer of a layer's input, or kept as an explicit divide.

SmoothQuant and AWQ (:mod:`qjax.ptq.smoothing`) quantize ``(x / s, diag(s) W)`` for a positive divisor ``s``
of the input's contracted shape ``K``. SmoothQuant (Xiao et al., ICML 2023, section 4) folds ``1 / s``
"into the previous layer's parameters offline": a LayerNorm / RMSNorm scale (and bias) or a previous
linear layer's output axes, so the smoothed model costs nothing at run time. For code nobody here wrote
this module finds such a fold numerically, for Linen and NNX alike (through the model view,
:mod:`qjax.ptq.model`):

1. **Groups.** Quantized layers whose contraction input is the same tensor (Llama's q/k/v read one
   RMSNorm output, gate/up another) must share one ``s``. They are found from the captured inputs
   (:mod:`qjax.ptq.capture`) on the first calibration batch: two layers are one group when their inputs
   have the same shape and the same fingerprint ``(u^T X, |u|^T |X|)`` (``u`` random per row) to
   ``1e-6`` relative. Two different tensors that happen to hold equal values group too; their fold is then
   refused by check 1 below and they keep the explicit divide.
2. **Candidates.** A candidate producer of a group with contracted shape ``K`` is a module's set of
   parameters whose trailing shape is ``K`` (a norm's scale ``(D,)`` and bias, a previous linear's weight
   ``(D, F)`` or ``(D, N, H)`` with output axes ``K`` and its bias); the group's own quantized weights are
   not candidates. They are tried nearest first (the longest module path prefix shared with the group,
   then the fewest path steps below it: a sibling before a cousin), at most :data:`MAX_CANDIDATES` per
   group.
3. **Check 1 (the input scales).** With the candidate's parameters multiplied by a random positive ``c``
   of shape ``K`` along their trailing axes, every member's captured input must be ``c`` times the
   original, channel by channel, to :data:`RTOL` (one capture pass per candidate, all groups at once).
   This rejects a producer that is not linear in its parameter: Gemma's RMSNorm ``x * (1 + w)`` fails it
   and keeps the explicit divide (its fold, ``(1 + w) / s - 1``, is not attempted).
4. **Check 2 (the producer quantizes alike).** A producer that is itself a quantized weight (v_proj
   feeding o_proj, up_proj feeding down_proj) must round to the same codes with its output axes scaled by
   ``c``: true for scales per output channel, false where a scale is shared along the folded axes (a
   per-tensor scale, a ``(D, N, H)`` weight scaled per ``H`` only). So a fold only moves the divide: the
   folded and the explicit-divide models quantize alike.
5. **Check 3 (the model is unchanged).** With the candidate divided by a random ``s`` and every member's
   weight stored as ``diag(s) W``, the float model's outputs on the batch must equal the original's to
   :data:`RTOL` relative (max abs difference over max abs value). A parameter that also feeds something
   outside the group (a tied or shared norm) fails it. Checks run group after group with the accepted
   folds applied, so the folds hold together; the methods check once more with the real ``s``.

Where no candidate passes the three checks the group keeps the explicit divide (an input transform stored on
each member, :mod:`qjax.input_transform`). :func:`qjax.ptq.smoothing_plan` returns the
:class:`SmoothingPlan` that ``smoothquant`` / ``awq`` use (deterministic: the same model, rules and first
batch give the same plan).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.input_transform import DIVISOR, transform_weight
from qjax.linen import unbox
from qjax.ptq.capture import Stat, capture_fn
from qjax.ptq.layers import Layer, Path, get_path, weight, with_weights
from qjax.qarray import QArray
from qjax.quantizer import quantize

FOLDS = ("auto", "never")
RTOL = 1e-5  # checks 1 and 3: the fold must be exact to float rounding
GROUP_RTOL = 1e-6  # two inputs with fingerprints this close are one tensor
MAX_CANDIDATES = 8  # candidates tried per group, nearest first
_KEY = 20230101  # the fixed seed of the fingerprints and the random c and s: a plan is deterministic


@dataclasses.dataclass(frozen=True)
class InputGroup:
    """Quantized layers reading one input tensor, and where their shared divisor ``s`` goes.

    ``members``: their module paths (``'/'``-joined, as the rules see them); ``shape``: the input's
    contracted shape ``K`` (the shape of ``s``); ``producer``: the parameter paths ``s`` is folded into
    (``p / s`` along their trailing axes), empty when the members keep an explicit divide; ``reason``:
    why not, for an empty ``producer``."""

    members: tuple[str, ...]
    shape: tuple[int, ...]
    producer: tuple[str, ...] = ()
    reason: str = ""

    @property
    def folded(self) -> bool:
        return bool(self.producer)


@dataclasses.dataclass(frozen=True)
class SmoothingPlan:
    """The groups of a model's quantized layers and where each group's divisor goes (module docstring);
    ``str(plan)`` is one line per group."""

    groups: tuple[InputGroup, ...]

    def folds(self) -> dict[str, tuple[str, ...]]:
        """``{member module path: producer parameter paths}`` for every folded layer."""
        return {m: g.producer for g in self.groups if g.folded for m in g.members}

    def group(self, module: str) -> InputGroup:
        """The group holding the module at path ``module``; ``ValueError`` naming the known ones."""
        for g in self.groups:
            if module in g.members:
                return g
        known = [m for g in self.groups for m in g.members]
        raise ValueError(f"SmoothingPlan.group: no quantized module {module!r}; allowed: {known[:20]}")

    def __str__(self) -> str:
        lines = []
        for g in self.groups:
            where = f"folded into {', '.join(g.producer)}" if g.folded else f"explicit divide ({g.reason})"
            lines.append(f"{', '.join(g.members)} (s {g.shape}): {where}")
        return "\n".join(lines)


def _fingerprint(rows: jax.Array, mask: jax.Array):
    """``(u^T X (2, K), |u|^T |X| (K,))`` of the unmasked rows, ``u`` a fixed random ``(n, 2)``."""
    rows = jnp.where(mask[:, None] > 0, rows, 0.0)
    u = jnp.asarray(np.random.default_rng(_KEY).standard_normal((rows.shape[0], 2)), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    return (jnp.matmul(u.T, rows, precision=hi),
            jnp.matmul(jnp.sum(jnp.abs(u), axis=1), jnp.abs(rows), precision=hi))


def _same(a, b, rtol: float) -> bool:
    (pa, aa), (pb, ab) = a, b
    if pa.shape != pb.shape:
        return False
    tol = rtol * np.maximum(np.asarray(aa), np.asarray(ab)) + 1e-30
    return bool(np.all(np.abs(np.asarray(pa) - np.asarray(pb)) <= tol)
                and np.all(np.abs(np.asarray(aa) - np.asarray(ab)) <= tol))


def _scaled(fp, c: np.ndarray):
    p, a = fp
    return np.asarray(p) * c, np.asarray(a) * c


def _param_leaves(tree, prefix: Path = ()):
    """``(path, float array)`` of every parameter of a params tree (boxes read through)."""
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            yield from _param_leaves(value, path)
            continue
        value = unbox(value)
        if (not isinstance(value, QArray) and hasattr(value, "dtype")
                and jnp.issubdtype(value.dtype, jnp.floating)):
            yield path, value


def _scale_trailing(params: Mapping, paths: Sequence[Path], factor) -> dict:
    """``params`` with each parameter at ``paths`` multiplied by ``factor`` along its trailing axes."""
    values = {}
    for path in paths:
        p = unbox(get_path(params, path))
        values[path] = (p * jnp.asarray(factor, p.dtype)).astype(p.dtype)
    return with_weights(params, values)


def _positive(seed: int, shape: tuple[int, ...], spread: float) -> np.ndarray:
    """A fixed random positive float32 vector ``exp(U(-spread, spread))`` of ``shape``."""
    return np.exp(np.random.default_rng(seed).uniform(-spread, spread, shape)).astype(np.float32)


def _scale_members(params: Mapping, members: Sequence[Layer], s: jax.Array) -> dict:
    """``params`` with each member's weight stored as ``diag(s) W``."""
    values = {}
    for layer in members:
        w = weight(params, layer)
        values[layer.path] = transform_weight({DIVISOR: s}, w)
    return with_weights(params, values)


def with_fingerprint(stat: Stat) -> Stat:
    """``stat`` and the input's fingerprint in one capture pass: ``(stat(rows, mask), fingerprint)``. The
    fingerprint is positively homogeneous, so it may be combined over calls and batches by ``jnp.add`` or
    ``jnp.maximum`` and the checks still hold (a method's statistics pass serves the plan too)."""

    def both(rows, mask):
        return stat(rows, mask), _fingerprint(rows, mask)

    return both


def fingerprints(fn: Callable) -> Callable:
    """``(params, rest, batch) -> {module: fingerprint}`` from a :func:`qjax.ptq.capture.capture_fn` of a
    :func:`with_fingerprint` statistic."""
    # called as qjax.ptq.capture.statistics calls it (active=None positional): one compiled program
    return lambda params, rest, batch: {m: v[1] for m, v in fn(params, rest, batch, None).items()}


class FloatCheck:
    """Check 3's reference: the float model (``view.apply``, jitted on first use) and its outputs on
    ``batch``."""

    def __init__(self, view, batch: Mapping):
        self.view, self.batch = view, batch

    @functools.cached_property
    def _apply(self):
        return jax.jit(self.view.apply)

    @functools.cached_property
    def want(self):
        return self._apply(self.view.params, self.view.rest, self.batch)

    def unchanged(self, params: Mapping) -> bool:
        """Whether the float model with ``params`` gives the original outputs to :data:`RTOL` relative."""
        return _outputs_close(self._apply(params, self.view.rest, self.batch), self.want, RTOL)


def _outputs_close(got, want, rtol: float) -> bool:
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        if not np.issubdtype(w.dtype, np.floating):
            if not np.array_equal(g, w):
                return False
            continue
        if np.max(np.abs(g - w), initial=0.0) > rtol * max(float(np.max(np.abs(w), initial=0.0)), 1e-30):
            return False
    return True


_quantize = jax.jit(quantize, static_argnums=0)


def _regridded(quantized: Mapping[Path, Layer], paths: Sequence[Path], params, c: np.ndarray) -> str:
    """Check 2: the name of a quantized weight among ``paths`` whose codes change when its trailing axes
    are scaled by ``c`` (its scales shared along them: a per-tensor scale, or a (D, N, H) weight scaled per
    H only), else ``""``. Such a fold would quantize the producer differently from the explicit divide."""
    for path in paths:
        layer = quantized.get(path)
        if layer is None:
            continue
        w = weight(params, layer).astype(jnp.float32)
        codes = np.asarray(_quantize(layer.quantizer, w).codes)
        moved = np.asarray(_quantize(layer.quantizer, w * jnp.asarray(c)).codes)
        if np.mean(codes != moved) > 1e-3:  # a rounding tie may flip a code or two, a shared scale many
            return layer.name
    return ""


def _common_prefix(a: Path, b: Path) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _shape(layer: Layer, params) -> tuple[int, ...]:
    return tuple(weight(params, layer).shape[: layer.contract])


def _groups(view, layers: Sequence[Layer], base: Mapping) -> list[list[Layer]]:
    groups: list[list[Layer]] = []
    for layer in layers:
        for group in groups:
            first = group[0]
            if (_shape(first, view.params) == _shape(layer, view.params)
                    and _same(base[first.module], base[layer.module], GROUP_RTOL)):
                group.append(layer)
                break
        else:
            groups.append([layer])
    return groups


def _candidates(leaves, members: Sequence[Layer], shape: tuple[int, ...]
                ) -> list[tuple[Path, tuple[Path, ...]]]:
    """``(module, parameter paths)`` with trailing shape ``shape``, nearest the group's first member."""
    own = {layer.path for layer in members}
    by_module: dict[Path, list[Path]] = {}
    order: dict[Path, int] = {}
    for i, (path, value) in enumerate(leaves):
        if path in own or value.ndim < len(shape) or tuple(value.shape[value.ndim - len(shape):]) != shape:
            continue
        by_module.setdefault(path[:-1], []).append(path)
        order.setdefault(path[:-1], i)
    anchor = members[0].module

    def distance(m: Path):  # the longest shared path prefix first, then the fewest steps down from it
        shared = _common_prefix(m, anchor)
        return -shared, len(m) - shared, order[m]

    ranked = sorted(by_module, key=distance)
    return [(m, tuple(by_module[m])) for m in ranked[:MAX_CANDIDATES]]


def plan(view, layers: Sequence[Layer], batch: Mapping, fold: str, token_mask: str | None, who: str,
         capture: Callable | None = None, check: FloatCheck | None = None) -> SmoothingPlan:
    """The :class:`SmoothingPlan` of ``layers`` (module docstring) from the calibration ``batch``;
    ``fold="never"`` only groups them (``fold``, one of :data:`FOLDS`, is checked by the caller).
    ``capture``: ``(params, rest, batch) -> {module: fingerprint}`` to reuse (:func:`fingerprints`;
    default: a capture pass of its own); ``check``: the :class:`FloatCheck` of ``view`` on ``batch`` to
    reuse."""
    modules = list(dict.fromkeys(layer.module for layer in layers))
    fn = capture or capture_fn(view, modules, _fingerprint, jnp.add, token_mask=token_mask)
    base = fn(view.params, view.rest, batch)
    groups = _groups(view, layers, base)
    names = lambda group: tuple("/".join(layer.module) for layer in group)
    if fold == "never":
        return SmoothingPlan(tuple(InputGroup(names(g), _shape(g[0], view.params), (), "fold='never'")
                                   for g in groups))
    leaves = list(_param_leaves(view.params))
    quantized = {layer.path: layer for layer in layers}
    check = check or FloatCheck(view, batch)
    seen: dict[tuple, dict] = {}  # candidate -> (c, fingerprints with the candidate scaled by c)
    current = view.params  # the accepted folds applied, with random divisors
    out = []
    for gi, group in enumerate(groups):
        shape = _shape(group[0], view.params)
        cands = _candidates(leaves, group, shape)
        if not cands:
            out.append(InputGroup(names(group), shape, (), f"no parameter has the trailing shape {shape}"))
            continue
        producer, refused = (), []  # why each candidate that scales the input was refused
        for module, paths in cands:
            cand = (paths, shape)
            if cand not in seen:
                c = _positive(_KEY + 1 + len(seen), shape, 0.5)
                seen[cand] = (c.reshape(-1), fn(_scale_trailing(view.params, paths, c), view.rest, batch))
            c, got = seen[cand]
            if not all(_same(got[m.module], _scaled(base[m.module], c), RTOL) for m in group):
                continue
            moved = _regridded(quantized, paths, view.params, c.reshape(shape))
            if moved:
                refused.append(f"folding into {moved} would change how it is quantized (its weight scales "
                               "are shared along the folded axes)")
                continue
            s = _positive(_KEY - 1 - gi, shape, 1.0)
            trial = _scale_members(_scale_trailing(current, paths, 1.0 / s), group, jnp.asarray(s))
            if check.unchanged(trial):
                producer, current = tuple("/".join(p) for p in paths), trial
                break
            refused.append(f"{'/'.join(module)} scales the input, but folding into it changes the model's "
                           "output (it also feeds something outside the group)")
        if producer:
            reason = ""
        elif refused:
            reason = "; ".join(refused)
        else:
            tried = ", ".join("/".join(m) for m, _ in cands)
            reason = f"no parameter scales the input exactly; tried {tried}"
        out.append(InputGroup(names(group), shape, producer, reason))
    return SmoothingPlan(tuple(out))


def group_layers(the_plan: SmoothingPlan, layers: Sequence[Layer]) -> list[list[Layer]]:
    """The plan's groups as lists of ``layers``."""
    by_module = {"/".join(layer.module): layer for layer in layers}
    return [[by_module[m] for m in g.members] for g in the_plan.groups]


def fold(view, the_plan: SmoothingPlan, layers: Sequence[Layer], scales: Mapping[Path, jax.Array],
         check: FloatCheck, who: str) -> tuple[dict, SmoothingPlan]:
    """``(params, plan)``: the float params with each folded group's producer divided by its ``s`` (the
    members' weights are left as they are: the method stores ``diag(s) W``), checked once more with the
    real divisors (check 3 of the module docstring, all folds together, then group by group if that
    fails: a group that fails keeps the explicit divide, with a warning)."""
    groups = group_layers(the_plan, layers)
    folded = [(g, members) for g, members in zip(the_plan.groups, groups, strict=True) if g.folded]
    if not folded:
        return view.params, the_plan

    def params_with(chosen, exact: bool):
        params = view.params
        for g, members in chosen:
            s = scales[members[0].module]
            params = _scale_trailing(params, [tuple(p.split("/")) for p in g.producer], 1.0 / s)
            if exact:
                params = _scale_members(params, members, s)
        return params

    if not check.unchanged(params_with(folded, True)):
        kept = []
        for item in folded:
            if check.unchanged(params_with([*kept, item], True)):
                kept.append(item)
            else:
                warnings.warn(f"{who}: folding the divisor of {', '.join(item[0].members)} into "
                              f"{', '.join(item[0].producer)} changes the float model's output beyond "
                              f"{RTOL} with the real divisor; kept as an explicit divide", stacklevel=3)
        dropped = {id(item[0]) for item in folded} - {id(item[0]) for item in kept}
        the_plan = SmoothingPlan(tuple(
            dataclasses.replace(g, producer=(), reason="the fold was not exact with the real divisor")
            if id(g) in dropped else g for g in the_plan.groups))
        folded = kept
    return params_with(folded, False), the_plan

