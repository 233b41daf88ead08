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
from collections.abc import Iterable, Sequence

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
        try:
            re.compile(self.path)
        except (re.error, TypeError) as err:
            raise ValueError(f"Rule path {self.path!r} is not a valid regex ({err})") from None
        if isinstance(self.types, str):
            object.__setattr__(self, "types", (self.types,))
        object.__setattr__(self, "types", tuple(t if isinstance(t, str) else t.__name__ for t in self.types))
        if isinstance(self.weight_names, str):
            object.__setattr__(self, "weight_names", (self.weight_names,))
        for field in ("weight", "input", "activations"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Quantizer):
                raise ValueError(f"Rule.{field} must be a Quantizer or None, got {value!r}")

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
    parameter up); warns, naming them, about rules that matched no module.
    """
    rules = check_rules(rules)
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
    unused = [r.label for r in rules if not any(r is e.rule for e in table.values())]
    if warn and unused:
        warnings.warn(f"qjax rules matched no module: {unused}; module paths: {sorted(table)[:20]}",
                      stacklevel=3)
    return table


def check_rules(rules) -> tuple[Rule, ...]:
    if isinstance(rules, Rule):
        rules = (rules,)
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise ValueError(f"rules must be qjax.rules.Rule objects, got {r!r}")
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


def _quantizer_from_dict(d):
    if d is None:
        return None
    d = dict(d)
    gran = dict(d.pop("granularity"))
    kind = gran.pop("type")
    if kind not in _GRANULARITIES:
        raise ValueError(f"unknown granularity {kind!r}; allowed: {', '.join(_GRANULARITIES)}")
    gran = {k: tuple(v) if isinstance(v, list) else v for k, v in gran.items()}
    return Quantizer(granularity=_GRANULARITIES[kind](**gran), **d)


def rule_to_dict(rule: Rule) -> dict:
    out = dataclasses.asdict(rule)
    for field in ("weight", "input", "activations"):
        out[field] = _quantizer_to_dict(getattr(rule, field))
    out["types"], out["weight_names"] = list(rule.types), list(rule.weight_names)
    return out


def rule_from_dict(d: dict) -> Rule:
    d = dict(d)
    for field in ("weight", "input", "activations"):
        d[field] = _quantizer_from_dict(d.get(field))
    d["types"], d["weight_names"] = tuple(d.get("types", ())), tuple(d.get("weight_names", ("kernel",)))
    return Rule(**d)


def rules_to_json(rules: Sequence[Rule]) -> str:
    return json.dumps([rule_to_dict(r) for r in check_rules(rules)], indent=1)


def rules_from_json(text: str) -> tuple[Rule, ...]:
    return tuple(rule_from_dict(d) for d in json.loads(text))
