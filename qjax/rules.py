"""Rules: which quantizer each module of a model gets, by module path regex and module type.

A :class:`Rule` says: modules whose path matches ``path`` (``re.fullmatch`` on the ``/``-joined path,
e.g. ``"encoder/layer/0/attention/self/query"``) and, if ``types`` is not empty, whose class name is one
of ``types``, quantize their weights with ``weight``, their inputs with ``input`` and, for attention-like
modules, the operands of the activation x activation contractions inside them with ``activations``.
The first rule that matches a module wins; modules no rule matches stay float. Rules are plain data:
:func:`rules_to_json` / :func:`rules_from_json` round-trip them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

from qjax import granularity as G
from qjax.quantizer import Quantizer

_GRANULARITIES = {cls.__name__: cls for cls in (G.PerTensor, G.PerChannel, G.PerToken, G.PerGroup,
                                                 G.PerBlock)}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One quantization rule (see the module docstring).

    Attributes:
      path: regex that must match the whole module path (``"/"``-joined).
      types: class names the module must have (any of); empty means any type.
      weight: quantizer for the module's weights (its params named in ``weight_names``), or ``None``.
      input: quantizer for the module's first positional input, or ``None``.
      activations: quantizer for both operands of every ``einsum``/``dot_general`` run directly inside
        the module (attention's ``q k^T`` and ``p v``), or ``None``.
      weight_names: which parameters count as weights (default ``("kernel",)``).
      name: a label for reports; defaults to the path regex.
    """

    path: str = ".*"
    types: tuple[str, ...] = ()
    weight: Quantizer | None = None
    input: Quantizer | None = None
    activations: Quantizer | None = None
    weight_names: tuple[str, ...] = ("kernel",)
    name: str | None = None

    def __post_init__(self):
        if not isinstance(self.path, str):
            raise TypeError(f"Rule.path must be a str (a regex on the '/'-joined module path), got "
                            f"{self.path!r}")
        try:
            re.compile(self.path)
        except re.error as err:
            raise ValueError(f"Rule path {self.path!r} is not a valid regex ({err})") from None
        for field in ("types", "weight_names"):
            value = getattr(self, field)
            value = (value,) if isinstance(value, str | type) else value
            if not isinstance(value, Iterable):
                raise TypeError(f"Rule.{field} must be a tuple of str, got {value!r}")
            object.__setattr__(self, field, tuple(value))
        object.__setattr__(self, "types", tuple(t.__name__ if isinstance(t, type) else t for t in self.types))
        for field in ("types", "weight_names"):
            bad = [t for t in getattr(self, field) if not isinstance(t, str) or not t]
            if bad:
                allowed = "class names or classes" if field == "types" else "parameter names"
                raise TypeError(f"Rule.{field} must hold {allowed} (non-empty str), got {bad!r}")
        if self.weight is not None and not self.weight_names:
            raise ValueError("Rule.weight_names is empty, so Rule.weight would quantize nothing; name the "
                             "parameters it quantizes, e.g. weight_names=('kernel',)")
        for field in ("weight", "input", "activations"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Quantizer):
                raise TypeError(f"Rule.{field} must be a qjax.Quantizer or None, got {value!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"Rule.name must be a str or None, got {self.name!r}")

    @property
    def label(self) -> str:
        return self.name or self.path

    def matches(self, path: str, type_name: str) -> bool:
        return re.fullmatch(self.path, path) is not None and (not self.types or type_name in self.types)

    def applies_to(self, contracted: Sequence[str]) -> bool:
        """Whether the rule can quantize a module that contracts the parameters ``contracted``: one of them
        is in ``weight_names``, or the rule quantizes activation x activation contractions."""
        return any(p in self.weight_names for p in contracted) or self.activations is not None


def match(rules: Sequence[Rule], path: str, type_name: str, contracted: Iterable[str] = ()) -> Rule | None:
    """The first rule that matches a module and can apply to it (:meth:`Rule.applies_to`), or ``None``."""
    contracted = tuple(contracted)
    for rule in rules:
        if rule.matches(path, type_name) and rule.applies_to(contracted):
            return rule
    return None


def assign(rules: Sequence[Rule], entries: Iterable, warn: bool = True) -> dict:
    """The table module path -> entry with its rule set (``None``: float), for module entries with
    ``name``, ``type_name``, ``params`` and ``contracted`` (the parameters the module contracts) fields
    (:class:`qjax.core.ModuleEntry`). The one rule matcher of both front ends.

    Raises ``ValueError`` (before anything is changed) for a rule that names a module by type but cannot
    apply to it (it contracts none of the rule's ``weight_names``: a typo, or a module that only looks its
    parameter up), and, when ``warn``, for rules with a quantizer of which none matched any module (the
    model would silently stay float): the message lists the modules qjax can quantize. Warns, naming them,
    about rules that matched no module while others did. ``warn=False`` (rules that may match nothing,
    e.g. a float baseline run with the same rules) neither warns nor raises for unmatched rules.
    """
    rules = check_rules(rules)
    entries = list(entries)
    table = {}
    for entry in entries:
        rule = match(rules, entry.name, entry.type_name, entry.contracted)
        if rule is None:
            for r in rules:
                if r.types and r.matches(entry.name, entry.type_name):
                    raise ValueError(
                        f"rule {r.label!r} names module {entry.name!r} ({entry.type_name}), but qjax cannot "
                        f"quantize it: it contracts none of weight_names={list(r.weight_names)}; its "
                        f"parameters: {list(entry.params)}, contracted: {list(entry.contracted)}")
        table[entry.name] = dataclasses.replace(entry, rule=rule)
    unused = [r for r in rules if not any(r is e.rule for e in table.values())]
    if not warn or not unused:
        return table
    why = "; ".join(_why_unused(r, table) for r in unused)
    eligible = sorted(e.name for e in entries if e.contracted)
    quantized = [e for e in table.values() if e.rule is not None and _quantizes(e.rule)]
    if not quantized and any(map(_quantizes, rules)):
        raise ValueError(f"qjax rules quantize no module of the model ({why}); modules qjax can quantize "
                         f"(they contract a parameter): {eligible[:40]}; all module paths: "
                         f"{sorted(table)[:40]}")
    warnings.warn(f"qjax rules matched no module ({why}); module paths: {sorted(table)[:20]}", stacklevel=3)
    return table


def _quantizes(rule: Rule) -> bool:
    return any(q is not None for q in (rule.weight, rule.input, rule.activations))


def _why_unused(rule: Rule, table: Mapping) -> str:
    """Why ``rule`` got no module: no path (and type) matches, an earlier rule won them (first match wins),
    or the modules it matches contract none of its ``weight_names``."""
    near = [e for e in table.values() if rule.matches(e.name, e.type_name)]
    names = [e.name for e in near][:8]
    if not near:
        of_types = f" of types {list(rule.types)}" if rule.types else ""
        return f"rule {rule.label!r} matches no module path{of_types}"
    won = [e for e in near if rule.applies_to(e.contracted)]
    if won:
        return (f"rule {rule.label!r}: earlier rules took {[e.name for e in won][:8]} (first match wins: "
                f"{sorted({e.rule.label for e in won})})")
    found = sorted({p for e in near for p in e.contracted})
    if not found:
        return f"rule {rule.label!r} matches {names} by path, but they contract no parameter"
    names = [e.name for e in near if e.contracted][:8]
    return (f"rule {rule.label!r} matches {names} by path, but they contract none of "
            f"weight_names={list(rule.weight_names)} (they contract {found})")


def check_rules(rules) -> tuple[Rule, ...]:
    """``rules`` as a tuple of :class:`Rule` (one Rule is accepted too); ``TypeError`` for anything else."""
    if isinstance(rules, Rule):
        rules = (rules,)
    if isinstance(rules, str | bytes | Mapping) or not isinstance(rules, Iterable):
        raise TypeError(f"rules must be a list of qjax.rules.Rule objects, got {rules!r:.200}")
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"rules must be qjax.rules.Rule objects, got {r!r:.200}")
    return rules


def format_table(table: dict[str, Rule | None]) -> str:
    """A printable two-column table: module path, rule label (``-`` for float)."""
    width = max([len(p) for p in table] + [6])
    lines = [f"{'module':<{width}}  rule", f"{'-' * width}  ----"]
    lines += [f"{p:<{width}}  {r.label if r else '-'}" for p, r in table.items()]
    return "\n".join(lines)


# --- serialization -----------------------------------------------------------------------------

def _quantizer_to_dict(q: Quantizer | None):
    if q is None:
        return None
    out = dataclasses.asdict(q)
    out["granularity"] = {"type": type(q.granularity).__name__, **dataclasses.asdict(q.granularity)}
    return out


def _fields(cls: type, d, where: str, skip: tuple[str, ...] = ()) -> dict:
    """The keyword arguments of dataclass ``cls`` in the JSON object ``d`` (lists as tuples); an object of
    another type, an unknown key or a missing required key is a ``ValueError`` naming it and ``where``."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a JSON object, got {d!r:.200}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields) - set(skip))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join([*skip, *fields])}")
    missing = [k for k, f in fields.items() if k not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} ({cls.__name__} needs them)")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k not in skip}


def _build(cls: type, kwargs: dict, where: str):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


def _quantizer_from_dict(d, where: str):
    if d is None:
        return None
    kwargs = _fields(Quantizer, d, where)
    if "granularity" in kwargs:
        gran = kwargs["granularity"]
        kind = gran.get("type") if isinstance(gran, dict) else None
        if kind not in _GRANULARITIES:
            raise ValueError(f"{where}.granularity: unknown or missing type {kind!r}; allowed: "
                             f"{', '.join(_GRANULARITIES)}")
        cls = _GRANULARITIES[kind]
        kwargs["granularity"] = _build(cls, _fields(cls, gran, f"{where}.granularity", ("type",)),
                                       f"{where}.granularity")
    return _build(Quantizer, kwargs, where)


def rule_to_dict(rule: Rule) -> dict:
    out = dataclasses.asdict(rule)
    for field in ("weight", "input", "activations"):
        out[field] = _quantizer_to_dict(getattr(rule, field))
    out["types"], out["weight_names"] = list(rule.types), list(rule.weight_names)
    return out


def rule_from_dict(d: dict, where: str = "rule") -> Rule:
    """The :class:`Rule` of a JSON object (:func:`rule_to_dict`'s); missing keys take their defaults."""
    kwargs = _fields(Rule, d, where)
    for field in ("weight", "input", "activations"):
        kwargs[field] = _quantizer_from_dict(kwargs.get(field), f"{where}.{field}")
    return _build(Rule, kwargs, where)


def rules_to_json(rules: Sequence[Rule]) -> str:
    return json.dumps([rule_to_dict(r) for r in check_rules(rules)], indent=1)


def rules_from_json(text: str) -> tuple[Rule, ...]:
    """The rules of :func:`rules_to_json`'s text: a JSON list of rule objects. A missing key takes its
    Python default (``{"format": "int4"}`` is ``Quantizer("int4")``, per tensor); a granularity needs its
    ``"type"``. Invalid JSON, an unknown key, a value of the wrong type or an unknown format name is a
    ``ValueError`` / ``TypeError`` naming the rule and the key."""
    if not isinstance(text, str | bytes):
        raise TypeError(f"rules_from_json takes the JSON text (str), got {type(text).__name__}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"rules_from_json: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"rules_from_json: expected a JSON list of rule objects, got {type(data).__name__}")
    return tuple(rule_from_dict(d, f"rule {i}") for i, d in enumerate(data))
