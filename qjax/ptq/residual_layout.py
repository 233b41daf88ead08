"""Where a pre-RMSNorm decoder's residual stream is read and written: a :class:`ResidualLayout` of path
regexes over the parameter paths (``"layers/0/attn/q_proj/w"``: module path and parameter name, ``/``-joined,
as :class:`qjax.Rule` paths are, matched with ``re.fullmatch``), :data:`LLAMA_LAYOUT` for Tunix's Llama 3,
Qwen 2 and Qwen 3, and the plan :func:`qjax.ptq.rotate_residual` follows (which norm feeds which linears,
which linears write into the stream), checked against the model's parameters before anything changes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np

from qjax import nnx as qn
from qjax.linen import unbox
from qjax.qarray import QArray

WHO = "rotate_residual"
_GROUP_REF = re.compile(r"\\(\d+)|\\g<(\w+)>")


def _check_regex(value, where: str) -> re.Pattern:
    if not isinstance(value, str):
        raise ValueError(f"{where}={value!r}; allowed: a str regex over '/'-joined parameter paths")
    try:
        return re.compile(value)
    except re.error as err:
        raise ValueError(f"{where}={value!r} is not a valid regex ({err})") from None


@dataclasses.dataclass(frozen=True)
class ResidualLayout:
    """How a pre-RMSNorm decoder's parameters relate to its residual stream, as path regexes.

    Every regex must match whole parameter paths (``re.fullmatch`` on ``"module/path/param"``, list indices
    as numbers: ``"layers/0/mlp/up_proj/kernel"``). The residual axis of a parameter is found by its size,
    ``D`` (the embedding's last axis): the *first* axis of size ``D`` for a reader (``(D, F)`` Dense
    kernels, Tunix ``(D, N, H)`` Einsum weights, ``(E, D, F)`` MoE experts, a ``(D, V)`` head), the *last*
    one for a writer (``(F, D)``, ``(N, H, D)``, ``(E, F, D)``) and the embedding ``(V, D)``.

    Attributes:
      embedding: the embedding table(s) ``(V, D)`` whose rows are added to the stream: ``E <- E Q``.
      norms: ``{norm regex: readers regex}``: the norm regex names each norm's *scale parameter* (``(D,)``)
        on the stream; the readers regex names the linears reading that norm's output, and may refer to the
        norm regex's groups (``\\1``, ``\\g<name>``), so ``{r"layers/(\\d+)/ln/scale":
        r"layers/\\1/attn/(q|k|v)/kernel"}`` gives each layer's norm its own readers. Their weights get
        ``W <- Q^T diag(g) W``; the norm's scale is set to the value that makes it 1.
      writers: the linears adding their output to the stream (attention output and MLP down projections):
        ``W <- W Q``; a writer's sibling ``bias`` parameter of shape ``(D,)`` is rotated with it,
        ``b <- b Q``.
      final_norm: the norm before the head (its scale parameter), or ``None`` for a model without one.
      head: the head's weight ``(D, V)``, which reads ``final_norm``: ``W <- Q^T diag(g) W``. It may match
        nothing: a head tied to the embedding (``logits = n(x) E^T``) is rotated with the embedding,
        ``(E Q)^T = Q^T E^T``, but it cannot take the final norm's scale, so that scale must then be uniform
        (a constant commutes with ``Q``); otherwise :func:`rotate_residual` refuses.
      unrotated: parameters that have an axis of size ``D`` but are not on the residual stream (e.g. Qwen's
        ``q_bias`` of size ``N * H == D``), or ``None``. Every other parameter with an axis of size ``D``
        that the layout does not name is an error: a missed reader or writer would silently change the
        model.
    """

    embedding: str
    norms: Mapping[str, str] | Sequence[tuple[str, str]]
    writers: str
    final_norm: str | None = None
    head: str | None = None
    unrotated: str | None = None

    def __post_init__(self):
        for field in ("embedding", "writers", "final_norm", "head", "unrotated"):
            value = getattr(self, field)
            if field in ("embedding", "writers") or value is not None:
                _check_regex(value, f"ResidualLayout.{field}")
        norms = self.norms
        pairs = tuple(norms.items()) if isinstance(norms, Mapping) else norms
        if isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs or not all(
                isinstance(p, tuple) and len(p) == 2 for p in pairs):
            raise ValueError(f"ResidualLayout.norms={norms!r}; allowed: a non-empty dict {{norm scale regex: "
                             "readers regex}}, e.g. {r'layers/(\\d+)/input_layernorm/w': "
                             "r'layers/\\1/attn/[qkv]_proj/w'}")
        for norm, readers in pairs:
            groups = _check_regex(norm, "ResidualLayout.norms key").groups
            _check_regex(_GROUP_REF.sub("x", readers) if isinstance(readers, str) else readers,
                         f"ResidualLayout.norms[{norm!r}]")
            names = re.compile(norm).groupindex
            for ref in _GROUP_REF.finditer(readers):
                number, name = ref.groups()
                if (number is not None and not 1 <= int(number) <= groups) or (name is not None
                                                                               and name not in names):
                    raise ValueError(f"ResidualLayout.norms[{norm!r}] = {readers!r} refers to group "
                                     f"{ref.group(0)!r}, which the norm regex does not have; allowed: \\1.."
                                     f"\\{groups} or \\g<name> for the groups {sorted(names)} of the norm "
                                     "regex")
        object.__setattr__(self, "norms", tuple(pairs))


LLAMA_LAYOUT = ResidualLayout(
    embedding=r"embedder/input_embedding",
    norms={r"layers/(\d+)/input_layernorm/w": r"layers/\1/attn/[qkv]_proj/w",
           r"layers/(\d+)/post_attention_layernorm/w":
               r"layers/\1/mlp/((gate|up)_proj(/kernel)?|router/kernel)"},
    writers=r"layers/\d+/(attn/o_proj/w|mlp/down_proj(/kernel)?)",
    final_norm=r"final_norm/w",
    head=r"lm_head/w",
    unrotated=r"layers/\d+/attn/([qkv]_bias|[qk]_norm/w)",
)
"""The layout of Tunix's ``Llama3``, ``Qwen2`` and ``Qwen3`` (``tunix.models.{llama3,qwen2,qwen3}``): the
``Embedder``'s ``input_embedding`` ``(V, D)``; per layer ``input_layernorm`` read by the ``q/k/v_proj``
Einsums ``(D, N, H)``, ``post_attention_layernorm`` read by the ``gate/up_proj`` Linears ``(D, F)`` (or,
in Qwen3's MoE, the expert Params ``(E, D, F)`` and the router ``(D, E)``); writers ``o_proj``
``(N, H, D)`` and ``down_proj`` ``(F, D)`` (MoE ``(E, F, D)``); ``final_norm`` read by ``lm_head``
``(D, V)``, or by the tied embedding (Llama 3.2's ``weight_tying``, Qwen2's ``use_tied_embedding``).
Qwen's q/k/v biases and Qwen3's per-head q/k norms are not on the stream."""




@dataclasses.dataclass(frozen=True)
class Norm:
    """One RMSNorm of the stream: its scale parameter's path, the linears reading its output, and whether
    it is the final norm (read by the head)."""

    path: str  # the scale parameter
    readers: tuple[str, ...]
    final: bool = False

    @property
    def module(self) -> str:
        return self.path.rpartition("/")[0]

    @property
    def param(self) -> str:
        return self.path.rpartition("/")[2]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`make_plan` found: the stream width ``D``, the embedding tables, the norms with their
    readers, and the linears writing into the stream."""

    width: int
    embeddings: tuple[str, ...]
    norms: tuple[Norm, ...]
    writers: tuple[str, ...]


def check_layout(layout) -> None:
    """A clear error unless ``layout`` is a :class:`ResidualLayout`."""
    if not isinstance(layout, ResidualLayout):
        raise ValueError(f"{WHO}: layout is a {type(layout).__name__}; allowed: a qjax.ptq.ResidualLayout "
                         "(e.g. qjax.ptq.LLAMA_LAYOUT for Tunix's Llama 3 / Qwen 2 / Qwen 3)")


def flatten_params(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, jax.Array]]:
    """``(path, leaf)`` of a nested parameter mapping, paths ``/``-joined."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_params(value, path + "/")
        else:
            yield path, unbox(value)


def _expand(template: str, match: re.Match) -> str:
    """The readers regex for one norm: ``\\1`` / ``\\g<name>`` replaced by the norm's matched text."""
    def group(ref: re.Match) -> str:
        number, name = ref.groups()
        return re.escape(match.group(int(number) if number is not None else name) or "")

    return _GROUP_REF.sub(group, template)


def _matching(regex: str, paths: Sequence[str]) -> list[str]:
    return [p for p in paths if re.fullmatch(regex, p)]


def _nothing(field: str, regex: str, paths: Sequence[str]) -> ValueError:
    return ValueError(f"{WHO}: layout.{field} = {regex!r} matches no parameter; the parameters are "
                      f"{list(paths)[:24]}{' ...' if len(paths) > 24 else ''}")


def make_plan(layout: ResidualLayout, flat: Mapping[str, jax.Array]) -> Plan:
    """Each parameter's role, with every regex matching something, no parameter in two roles, the norm
    scales ``(D,)`` and every other parameter with an axis of size ``D`` named ``unrotated``."""
    paths = list(flat)
    roles: dict[str, str] = {}

    def claim(path: str, role: str) -> None:
        if path in roles and roles[path] != role:
            raise ValueError(f"{WHO}: parameter {path!r} is both {roles[path]} and {role} in the layout; "
                             "allowed: one role per parameter (make the regexes disjoint)")
        roles[path] = role

    embeddings = _matching(layout.embedding, paths)
    if not embeddings:
        raise _nothing("embedding", layout.embedding, paths)
    widths = {p: np.shape(flat[p])[-1] if np.ndim(flat[p]) >= 1 else None for p in embeddings}
    width = widths[embeddings[0]]
    bad = {p: np.shape(flat[p]) for p, w in widths.items() if w != width or np.ndim(flat[p]) < 2}
    if width is None or bad:
        raise ValueError(f"{WHO}: layout.embedding matches tables of shapes "
                         f"{ {p: np.shape(flat[p]) for p in embeddings} }; allowed: (V, D) tables with one "
                         "width D (the residual stream's)")
    for p in embeddings:
        claim(p, "embedding")

    norms: list[Norm] = []
    for regex, template in layout.norms:
        found = [(p, m) for p in paths if (m := re.fullmatch(regex, p))]
        if not found:
            raise _nothing(f"norms key {regex!r}", regex, paths)
        for path, match in found:
            readers_regex = _expand(template, match)
            readers = _matching(readers_regex, paths)
            if not readers:
                raise ValueError(f"{WHO}: the readers of norm {path!r} (layout.norms[{regex!r}] = "
                                 f"{template!r}, here {readers_regex!r}) match no parameter; the parameters "
                                 f"are {paths[:24]}{' ...' if len(paths) > 24 else ''}")
            norms.append(Norm(path, tuple(readers)))
    if layout.final_norm is not None:
        found = _matching(layout.final_norm, paths)
        if len(found) != 1:
            raise (_nothing("final_norm", layout.final_norm, paths) if not found else ValueError(
                f"{WHO}: layout.final_norm = {layout.final_norm!r} matches {found}; allowed: one parameter"))
        head = _matching(layout.head, paths) if layout.head is not None else []
        norms.append(Norm(found[0], tuple(head), final=True))
    elif layout.head is not None:
        raise ValueError(f"{WHO}: layout.head = {layout.head!r} without layout.final_norm; allowed: name the "
                         "final norm the head reads (a pre-norm decoder has one)")
    for norm in norms:
        claim(norm.path, "a norm scale")
        shape = np.shape(flat[norm.path])
        if shape != (width,):
            raise ValueError(f"{WHO}: norm scale {norm.path!r} has shape {shape}; allowed: ({width},), one "
                             f"scale per residual channel (stacked / scanned layers are not supported)")
        for reader in norm.readers:
            claim(reader, f"a reader of {norm.path!r}")
            stream_axis(flat[reader], width, first=True, path=reader)

    writers = _matching(layout.writers, paths)
    if not writers:
        raise _nothing("writers", layout.writers, paths)
    for path in list(writers):
        bias = path.rpartition("/")[0] + "/bias"
        if bias in flat and bias not in writers and np.shape(flat[bias]) == (width,) and bias not in roles:
            writers.append(bias)
    for path in writers:
        claim(path, "a writer")
        stream_axis(flat[path], width, first=False, path=path)

    norm_modules = {norm.module for norm in norms}  # a norm's other parameters: the probe judges them
    missed = [p for p in paths if p not in roles and width in np.shape(flat[p])
              and p.rpartition("/")[0] not in norm_modules
              and not (layout.unrotated is not None and re.fullmatch(layout.unrotated, p))]
    if missed:
        raise ValueError(f"{WHO}: parameters {missed[:12]} have an axis of the residual width {width} but "
                         "the layout names them nowhere: a reader or writer left out would change the model; "
                         "allowed: add them to layout.norms' readers, layout.writers or layout.head, or to "
                         "layout.unrotated if they are not on the residual stream")
    return Plan(width, tuple(embeddings), tuple(norms), tuple(writers))


def stream_axis(w, width: int, *, first: bool, path: str = "") -> int:
    """The residual axis: the first (reader) or last (writer) axis of size ``width``."""
    axes = [i for i, n in enumerate(np.shape(w)) if n == width]
    if not axes:
        role = "reader" if first else "writer"
        raise ValueError(f"{WHO}: {role} {path!r} has shape {np.shape(w)}, no axis of the residual width "
                         f"{width}; allowed: a linear weight with an axis of size {width}")
    return axes[0] if first else axes[-1]


def refuse_quantized(view, model, variables) -> None:
    """A clear error when the model is quantized already: the rotation rewrites float weights only."""
    if view.front_end == "nnx":
        quantized = isinstance(getattr(model, qn.HPARAMS, None), qn.Hyperparams) or bool(view.frozen_start)
    else:
        leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, QArray))
        quantized = "quant" in variables or any(isinstance(x, QArray) for x in leaves)
    if quantized:
        raise ValueError(f"{WHO}: the model is quantized or frozen; allowed: the float model (rotate its "
                         "residual stream first, then quantize it with a PTQ method)")
