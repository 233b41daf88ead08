"""Rules: first match wins, types, serialization, unused-rule warnings."""

import warnings

import pytest

from qjax import PerChannel, PerGroup, PerToken, Quantizer
from qjax.core import ModuleEntry
from qjax.rules import Rule, assign, format_table, match, rules_from_json, rules_to_json

W4 = Quantizer("int4", PerGroup(0, 32))
BIN = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")


def test_first_match_wins_and_types():
    rules = [Rule(r".*head", weight=W4, name="head"), Rule(r".*", types=("Dense",), weight=BIN),
             Rule(r"block_\d+/.*", weight=W4)]
    k = ("kernel",)
    assert match(rules, "lm_head", "Dense", k).name == "head"
    assert match(rules, "block_0/mlp_in", "Dense", k) is rules[1]
    assert match(rules, "block_0/attention/query", "DenseGeneral", k) is rules[2]
    assert match(rules, "embed", "Embed", ()) is None  # looked up, never contracted


def entry(path, type_name="Dense", params=("kernel", "bias"), contracted=("kernel",)):
    return ModuleEntry(tuple(path.split("/")), type_name, params, contracted)


def test_path_is_a_full_match():
    rule = Rule("Dense_1", weight=W4)
    assert rule.matches("Dense_1", "Dense") and not rule.matches("Dense_10", "Dense")
    assert not rule.matches("x/Dense_1", "Dense")


def test_types_accept_classes():
    import flax.linen as nn

    assert Rule(".*", types=(nn.Dense, "Conv")).types == ("Dense", "Conv")
    assert Rule(".*", types="Conv").types == ("Conv",)


def test_assign_table_and_unused_warning():
    rules = [Rule("a", weight=W4), Rule("never", weight=BIN, name="unused-rule")]
    with pytest.warns(UserWarning, match="unused-rule"):
        table = assign(rules, [entry("a"), entry("b")])
    assert {k: e.rule for k, e in table.items()} == {"a": rules[0], "b": None}
    text = format_table({k: e.rule for k, e in table.items()})
    assert "a" in text and "-" in text.splitlines()[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assign(rules[:1], [entry("a")])


def test_a_module_is_eligible_by_what_it_contracts():
    rules = [Rule(".*", weight=W4, weight_names=("kernel", "w"))]
    table = assign(rules, [entry("lin", "Linear"), entry("einsum", "Einsum", ("w",), ("w",)),
                           entry("embed", "Embed", ("embedding",), ()),
                           entry("norm", "LayerNorm", ("scale",), ())])
    assert [k for k, e in table.items() if e.rule] == ["lin", "einsum"]


def test_a_rule_naming_a_module_it_cannot_quantize_is_an_error():
    with pytest.raises(ValueError, match=r"names module 'proj' \(Dense\).*weight_names=\['kernal'\]"):
        assign([Rule(".*", types=("Dense",), weight=W4, weight_names=("kernal",))], [entry("proj")])
    with pytest.raises(ValueError, match=r"names module 'embed' \(Embed\).*contracted: \[\]"):
        assign([Rule(".*", types=("Embed",), weight=W4, weight_names=("embedding",))],
               [entry("embed", "Embed", ("embedding",), ())])


def test_json_round_trip():
    rules = (Rule(r"block_\d+/.*", types=("Dense", "DenseGeneral"), weight=W4,
                  input=Quantizer("int8", PerToken(-1)), name="blocks"),
             Rule(".*attention", activations=Quantizer("int8", PerToken((-1,)))),
             Rule(".*", weight=Quantizer("binary", PerChannel((-1,)), "learned", "biper"),
                  weight_names=("w",)))
    assert rules_from_json(rules_to_json(rules)) == rules


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"path": "("}, ValueError, r"Rule path '\(' is not a valid regex"),
    ({"path": 3}, TypeError, r"Rule.path must be a str .* got 3"),
    ({"weight": "int4"}, TypeError, r"Rule.weight must be a qjax.Quantizer or None, got 'int4'"),
    ({"types": (3,)}, TypeError, r"Rule.types must hold class names .* got \[3\]"),
    ({"weight": W4, "weight_names": ()}, ValueError, r"weight_names is empty"),
])
def test_bad_rules(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        Rule(**kwargs)


def test_rules_must_be_rules():
    with pytest.raises(TypeError, match=r"must be qjax\.rules\.Rule objects, got 'Dense'"):
        assign(["Dense"], [])
    with pytest.raises(TypeError, match=r"must be a list of qjax\.rules\.Rule objects"):
        assign("Dense", [])


def test_rules_that_quantize_nothing_are_an_error_listing_what_can_be_quantized():
    entries = [entry("layers/0"), entry("layers/1"), entry("norm", "LayerNorm", ("scale",), ())]
    with pytest.raises(ValueError, match=r"quantize no module.*'layers/.*' matches no module path.*"
                                         r"can quantize .*\['layers/0', 'layers/1'\]"):
        assign([Rule(r"layers/\d+/.*", weight=W4)], entries)
    with pytest.raises(ValueError, match=r"matches \['layers/0', 'layers/1'\] by path, but they contract "
                                         r"none of weight_names=\['kernal'\] \(they contract \['kernel'\]\)"):
        assign([Rule(r"layers/.*", weight=W4, weight_names=("kernal",))], entries)
    assert all(e.rule is None for e in assign([Rule("x", weight=W4)], entries, warn=False).values())
    assert all(e.rule is None for e in assign([], entries).values())  # no rules: float, by request
    with pytest.warns(UserWarning, match=r"'late': earlier rules took \['layers/0'\]"):
        assign([Rule(".*", weight=W4), Rule("layers/0", weight=BIN, name="late")], entries)


@pytest.mark.parametrize(("text", "exc", "message"), [
    ("[{", ValueError, r"not valid JSON"),
    ('{"path": ".*"}', ValueError, r"expected a JSON list of rule objects, got dict"),
    ('[{"wieght": null}]', ValueError, r"rule 0: unknown key\(s\) \['wieght'\]; allowed: path, types"),
    ('[{}, {"weight": {"format": "int9"}}]', ValueError, r"rule 1.weight: unknown format 'int9'"),
    ('[{"weight": {"format": "int4", "granularity": {"axis": 0}}}]', ValueError,
     r"rule 0.weight.granularity: unknown or missing type None; allowed: PerTensor"),
    ('[{"weight": {"granularity": {"type": "PerGroup", "axis": 0}}}]', ValueError,
     r"granularity: missing key\(s\) \['size'\]"),
    ('[{"path": 3}]', TypeError, r"rule 0: Rule.path must be a str"),
])
def test_bad_rules_json(text, exc, message):
    with pytest.raises(exc, match=message):
        rules_from_json(text)


def test_json_missing_keys_take_their_python_defaults():
    rule, = rules_from_json('[{"types": "Dense", "weight": {"format": "int4"}}]')
    assert rule == Rule(".*", types=("Dense",), weight=Quantizer("int4"))
