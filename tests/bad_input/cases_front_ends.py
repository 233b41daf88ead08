"""Bad input to rules and both front ends: Rule fields, rules JSON, quantize_model, freeze, paths, hparams."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax import PerChannel, QArray, Quantizer, Rule
from qjax import linen as ql
from qjax import nnx as qn
from qjax.rules import rules_from_json, rules_to_json
from tests.bad_input.table import Documented, Raises, Warns, case

W4 = Quantizer("int4", PerChannel(-1))
RESTE = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")
X = jax.random.normal(jax.random.key(1), (2, 8))
JSON = rules_to_json([Rule(".*", types=("Dense",), weight=W4)])


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.relu(nn.Dense(4, name="hidden")(x)))


class NnxStack(nnx.Module):
    """Layers in an nnx.List: module paths ``layers/0``, ``layers/1`` (the README's NNX example)."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(8, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@functools.cache
def linen():
    """A quantized Linen MLP, its variables and their frozen form (built once, never changed)."""
    qmodel = ql.quantize_model(LinenMLP(), [Rule(".*", weight=W4)])
    variables = qmodel.init(jax.random.key(0), X)
    return qmodel, variables, ql.freeze(qmodel, variables, X)


def quantized_nnx(rules=None, **kwargs):
    model = NnxStack()
    rules = [Rule(r"layers/\d+(/.*)?", weight=W4)] if rules is None else rules
    hparams = qn.quantize_model(model, rules, X, **kwargs)
    return model, hparams


def frozen_nnx():
    model, _ = quantized_nnx()
    qn.freeze(model)
    return model


def init(rules, model=None):
    return ql.quantize_model(model or LinenMLP(), rules).init(jax.random.key(0), X)


def other_variables():
    class Wider(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.relu(nn.Dense(5, name="hidden")(x)))

    return Wider().init(jax.random.key(0), X)


def freeze_twice():
    qmodel, _, frozen = linen()
    return frozen, ql.freeze(qmodel, frozen, X)


def check_freeze_twice(result):
    first, second = result
    a, b = first["params"]["hidden"]["kernel"], second["params"]["hidden"]["kernel"]
    assert isinstance(b, QArray) and a.packing == b.packing
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scale, b.scale)


def nnx_freeze_twice():
    model = frozen_nnx()
    before = model.layers[0].kernel.qarray
    qn.freeze(model)
    return before, model.layers[0].kernel.qarray


def check_same_qarray(result):
    before, after = result
    assert after is before


def float_output(make_qmodel):
    model = LinenMLP()
    variables = model.init(jax.random.key(0), X)
    return make_qmodel(model).apply(variables, X), model.apply(variables, X)


def check_bit_identical(result):
    got, want = result
    assert np.array_equal(got, want)


def unquantize_float():
    model = NnxStack()
    before = model(X)
    qn.unquantize_model(model)
    return type(model), model(X), before


def check_untouched(result):
    cls, got, want = result
    assert cls is NnxStack and np.array_equal(got, want)


def keep_float_rule():
    qmodel = ql.quantize_model(LinenMLP(), [Rule("head"), Rule(".*", weight=W4)])
    variables = qmodel.init(jax.random.key(0), X)
    return qmodel.paths(variables, X)


def check_head_float(paths):
    assert paths["head"] == ql.FLOAT and paths["hidden"] != ql.FLOAT


def nnx_paths(rules, **kwargs):
    model, _ = quantized_nnx(rules, **kwargs)
    return qn.paths(model)


def check_both_layers(paths):
    assert set(paths) == {"layers/0", "layers/1"} and ql.FLOAT not in paths.values()


def check_only_hidden(paths):
    assert set(paths) == {"hidden"}


def linen_paths(rules):
    qmodel = ql.quantize_model(LinenMLP(), rules)
    variables = qmodel.init(jax.random.key(0), X)
    return {k: v for k, v in qmodel.paths(variables, X).items() if v != ql.FLOAT}


def module_table_of_quantized():
    model, _ = quantized_nnx()
    return qn.module_table(model, [Rule("nothing", weight=RESTE)])


def check_table_from_quantization(table):
    assert table["layers/0"].rule.weight == W4


def check_rule(expected):
    def check(rules):
        assert rules == (expected,), rules
    return check


def set_hparam(**values):
    _, hparams = quantized_nnx([Rule(r"layers/\d+", weight=RESTE)], hparams={"o": 1.0})
    hparams.set(**values)


def bad_json(old, new):
    return lambda: rules_from_json(JSON.replace(old, new))


CASES = [
    # --- Rule fields ---------------------------------------------------------------------------------
    case("front_ends-rule-path-bad-regex", lambda: Rule("layers/(\\d+"),
         Raises(r"Rule path 'layers/\(\\\\d\+' is not a valid regex")),
    case("front_ends-rule-path-not-str", lambda: Rule(3),
         Raises(r"Rule.path must be a str.*got 3", TypeError)),
    case("front_ends-rule-types-not-names", lambda: Rule(types=(3,)),
         Raises(r"Rule.types must hold class names or classes .*got \[3\]", TypeError)),
    case("front_ends-rule-types-not-iterable", lambda: Rule(types=3),
         Raises(r"Rule.types must be a tuple of str, got 3", TypeError)),
    case("front_ends-rule-weight-not-quantizer", lambda: Rule(weight="int4"),
         Raises(r"Rule.weight must be a qjax.Quantizer or None, got 'int4'", TypeError)),
    case("front_ends-rule-input-not-quantizer", lambda: Rule(input=8),
         Raises(r"Rule.input must be a qjax.Quantizer or None, got 8", TypeError)),
    case("front_ends-rule-weight-names-empty", lambda: Rule(weight=W4, weight_names=()),
         Raises(r"weight_names is empty.*e\.g\. weight_names=\('kernel',\)")),
    case("front_ends-rule-weight-names-not-str", lambda: Rule(weight=W4, weight_names=(None,)),
         Raises(r"Rule.weight_names must hold parameter names .*got \[None\]", TypeError)),
    case("front_ends-rule-name-not-str", lambda: Rule(name=1),
         Raises(r"Rule.name must be a str or None, got 1",
                                                                     TypeError)),
    case("front_ends-rules-not-rules", lambda: ql.quantize_model(LinenMLP(), ["Dense"]),
         Raises(r"rules must be qjax.rules.Rule objects, got 'Dense'", TypeError)),
    case("front_ends-rules-a-string", lambda: qn.quantize_model(NnxStack(), "Dense", X),
         Raises(r"rules must be a list of qjax.rules.Rule objects, got 'Dense'", TypeError)),
    # --- rules that cannot apply, or quantize nothing ------------------------------------------------
    case("front_ends-weight-names-typo-with-types-linen",
         lambda: init([Rule(".*", types=("Dense",), weight=W4, weight_names=("kernal",))]),
         Raises(r"names module 'hidden' \(Dense\).*weight_names=\['kernal'\].*contracted: \['kernel'\]")),
    case("front_ends-weight-names-typo-with-types-nnx",
         lambda: quantized_nnx([Rule(".*", types=("Linear",), weight=W4, weight_names=("kernal",))]),
         Raises(r"names module 'layers/0' \(Linear\).*weight_names=\['kernal'\]")),
    case("front_ends-weight-names-typo-linen",
         lambda: init([Rule(".*", weight=W4, weight_names=("kernal",))]),
         Raises(r"quantize no module.*contract none of weight_names=\['kernal'\] "
                r"\(they contract \['kernel'\]\).*can quantize .*\['head', 'hidden'\]")),
    case("front_ends-nnx-list-regex-matches-nothing",
         lambda: quantized_nnx([Rule(r"layers/\d+/.*", weight=W4)]),
         Raises(r"quantize no module.*matches no module path.*can quantize .*\['layers/0', 'layers/1'\]")),
    case("front_ends-linen-rules-match-nothing", lambda: init([Rule("Dense_\\d+", weight=W4)]),
         Raises(r"quantize no module.*'Dense_\\\\d\+' matches no module path.*\['head', 'hidden'\]")),
    case("front_ends-all-taken-by-keep-float-rule", lambda: init([Rule(".*"), Rule("hidden", weight=W4)]),
         Raises(r"quantize no module.*'hidden': earlier rules took \['hidden'\]")),
    case("front_ends-rule-matches-nothing-others-do", lambda: linen_paths([Rule("hidden", weight=W4),
                                                                           Rule("nope", weight=W4)]),
         Warns(r"matched no module.*'nope' matches no module path", check_only_hidden)),
    case("front_ends-rule-shadowed", lambda: linen_paths([Rule("hidden", weight=W4),
                                                          Rule("hid.*", weight=RESTE, name="late")]),
         Warns(r"'late': earlier rules took \['hidden'\] \(first match wins", check_only_hidden)),
    case("front_ends-nnx-rule-matches-nothing-others-do",
         lambda: nnx_paths([Rule(r"layers/\d+", weight=W4), Rule("never", weight=W4)]),
         Warns(r"matched no module.*'never'", check_both_layers)),
    case("front_ends-nnx-list-regex-fixed", lambda: nnx_paths([Rule(r"layers/\d+(/.*)?", weight=W4)]),
         Documented(check_both_layers, "README NNX example: `layers/\\d+(/.*)?` matches nnx.List paths "
                                       "layers/0")),
    case("front_ends-no-rules-is-float", lambda: float_output(lambda m: ql.quantize_model(m, [])),
         Documented(check_bit_identical, "no rules: nothing asked, the model runs float, bit for bit")),
    case("front_ends-warn-unused-false-is-float",
         lambda: float_output(lambda m: ql.quantize_model(m, [Rule("x", weight=W4)], warn_unused=False)),
         Documented(check_bit_identical, "quantize_model docstring: warn_unused=False allows rules matching "
                                         "nothing (a float baseline)")),
    case("front_ends-keep-float-rule", keep_float_rule,
         Documented(check_head_float, "qjax.rules: first match wins; a rule without quantizers keeps float")),
    # --- the front ends' entry points ----------------------------------------------------------------
    case("front_ends-linen-not-a-linen-model", lambda: ql.quantize_model(NnxStack(), [Rule(weight=W4)]),
         Raises(r"expects a flax.linen Module, got NnxStack \(an nnx.Module: use qjax.nnx.quantize_model\)",
                TypeError)),
    case("front_ends-nnx-not-an-nnx-model", lambda: qn.quantize_model(LinenMLP(), [Rule(weight=W4)], X),
         Raises(r"expects an nnx.Module, got LinenMLP \(a flax.linen Module: use qjax.linen", TypeError)),
    case("front_ends-nnx-not-a-model-at-all", lambda: qn.quantize_model(lambda x: x, [Rule(weight=W4)], X),
         Raises(r"expects an nnx.Module, got function", TypeError)),
    case("front_ends-nnx-no-example-inputs", lambda: qn.quantize_model(NnxStack(), [Rule(weight=W4)]),
         Raises(r"needs example inputs .*quantize_model\(model, rules, x\)")),
    case("front_ends-nnx-wrong-example-shape",
         lambda: qn.quantize_model(NnxStack(), [Rule(weight=W4)], jnp.ones((2, 5))),
         Raises(r"model\(\*example inputs\) failed while qjax traced it.*TypeError.*pass example inputs")),
    case("front_ends-nnx-already-quantized",
         lambda: qn.quantize_model(quantized_nnx()[0], [Rule(weight=W4)], X),
         Raises(r"already quantized; call qjax.nnx.unquantize_model first")),
    case("front_ends-nnx-module-table-no-example", lambda: qn.module_table(NnxStack(), [Rule(weight=W4)]),
         Raises(r"qjax.nnx.module_table needs example inputs")),
    case("front_ends-nnx-module-table-of-quantized", module_table_of_quantized,
         Documented(check_table_from_quantization, "module_table docstring: a quantized model answers from "
                                                   "what it was quantized with")),
    case("front_ends-product-unknown",
         lambda: ql.quantize_model(LinenMLP(), [Rule(weight=W4)], product="int4"),
         Raises(r"unknown QAT product 'int4'; allowed: auto, int8, float")),
    case("front_ends-backend-unknown-nnx-freeze", lambda: qn.freeze(quantized_nnx()[0], backend="cuda"),
         Raises(r"unknown kernel backend 'cuda'; allowed: auto, xla, pallas, interpret")),
    # --- variables: before init, wrong ones, frozen twice --------------------------------------------
    case("front_ends-linen-freeze-before-init", lambda: ql.freeze(linen()[0], {}, X),
         Raises(r"variables must be the model's variables, a dict with a 'params' collection .*qmodel.init")),
    case("front_ends-linen-freeze-empty-params", lambda: ql.freeze(linen()[0], {"params": {}}, X),
         Raises(r"cannot run on these variables and inputs \(InvalidRngError: .*pass the variables that "
                r"qmodel.init")),
    case("front_ends-linen-freeze-other-models-variables",
         lambda: ql.freeze(linen()[0], other_variables(), X),
         Raises(r"cannot run on these variables.*ScopeParamShapeError.*hidden")),
    case("front_ends-linen-apply-wrong-input-shape", lambda: linen()[0].apply(linen()[1], jnp.ones((2, 5))),
         Raises(r"cannot run on these variables and inputs \(ScopeParamShapeError")),
    case("front_ends-linen-apply-params-array", lambda: linen()[0].apply({"params": jnp.ones(3)}, X),
         Raises(r"a dict with a 'params' collection .*got \['params'\]")),
    case("front_ends-linen-paths-before-init", lambda: linen()[0].paths(None, X),
         Raises(r"a dict with a 'params' collection .*got NoneType")),
    case("front_ends-linen-dry-run-no-inputs", lambda: linen()[0].dry_run(linen()[1]),
         Raises(r"cannot run on these variables and inputs \(TypeError: .*x")),
    case("front_ends-linen-freeze-twice", freeze_twice,
         Documented(check_freeze_twice, "freezing frozen variables keeps their QArrays (idempotent)")),
    case("front_ends-nnx-freeze-before-quantize", lambda: qn.freeze(NnxStack()),
         Raises(r"the model is not quantized; call qjax.nnx.quantize_model first")),
    case("front_ends-nnx-paths-before-quantize", lambda: qn.paths(NnxStack()),
         Raises(r"qjax.nnx.paths: the model is not quantized; call qjax.nnx.quantize_model first")),
    case("front_ends-nnx-freeze-twice", nnx_freeze_twice,
         Documented(check_same_qarray, "qjax.nnx.freeze: PackedWeights are kept (idempotent)")),
    case("front_ends-nnx-unquantize-frozen", lambda: qn.unquantize_model(frozen_nnx()),
         Raises(r"the model is frozen; its float weights are gone")),
    case("front_ends-nnx-unquantize-float-model", unquantize_float,
         Documented(check_untouched, "unquantize_model docstring: a model that is not quantized is "
                                     "left as is")),
    # --- hyperparameters -----------------------------------------------------------------------------
    case("front_ends-hparams-unknown-linen", lambda: linen()[0].apply(linen()[1], X, hparams={"omgea": 1.0}),
         Raises(r"unknown QAT hyperparameter\(s\) \['omgea'\]; allowed: ")),
    case("front_ends-hparams-unknown-nnx", lambda: quantized_nnx(hparams={"0": 1.0}),
         Raises(r"unknown QAT hyperparameter\(s\) \['0'\]; allowed: ")),
    case("front_ends-hparams-undeclared-nnx-set", lambda: set_hparam(omega=2.0),
         Raises(r"hyperparameter 'omega' was not declared; declared: .*'o'.*"
                r"quantize_model\(\.\.\., hparams=")),
    case("front_ends-hparams-nan-nnx-set", lambda: set_hparam(o=float("nan")),
         Raises(r"hyperparameter o=nan must be finite")),
    case("front_ends-hparams-zero-nnx-set", lambda: set_hparam(o=0.0),
         Raises(r"hyperparameter o=0.0 is out of range; allowed: o > 0")),
    case("front_ends-hparams-inf-linen-apply",
         lambda: linen()[0].apply(linen()[1], X, hparams={"o": float("inf")}),
         Raises(r"hyperparameter o=inf must be finite")),
    # --- rules as JSON -------------------------------------------------------------------------------
    case("front_ends-json-invalid", lambda: rules_from_json(JSON[:-3]),
         Raises(r"rules_from_json: not valid JSON")),
    case("front_ends-json-not-text", lambda: rules_from_json([Rule()]),
         Raises(r"rules_from_json takes the JSON text \(str\), got list", TypeError)),
    case("front_ends-json-not-a-list", lambda: rules_from_json('{"path": ".*"}'),
         Raises(r"expected a JSON list of rule objects, got dict")),
    case("front_ends-json-rule-not-object", lambda: rules_from_json('[".*"]'),
         Raises(r"rule 0 must be a JSON object, got '\.\*'")),
    case("front_ends-json-unknown-rule-key", bad_json('"weight_names"', '"weight_name"'),
         Raises(r"rule 0: unknown key\(s\) \['weight_name'\]; allowed: path, types, weight, input")),
    case("front_ends-json-unknown-quantizer-key", bad_json('"bases"', '"base"'),
         Raises(r"rule 0.weight: unknown key\(s\) \['base'\]; allowed: format, granularity, scale")),
    case("front_ends-json-unknown-format", bad_json('"int4"', '"int16"'),
         Raises(r"rule 0.weight: unknown format 'int16'.*allowed: int2")),
    case("front_ends-json-unknown-granularity", bad_json('"PerChannel"', '"PerChanel"'),
         Raises(r"rule 0.weight.granularity: unknown or missing type 'PerChanel'; allowed: "
                r"PerTensor, PerChannel")),
    case("front_ends-json-granularity-without-type", bad_json('"type": "PerChannel",', ''),
         Raises(r"rule 0.weight.granularity: unknown or missing type None; allowed: PerTensor")),
    case("front_ends-json-granularity-missing-size", bad_json('"PerChannel"', '"PerGroup"'),
         Raises(r"rule 0.weight.granularity: missing key\(s\) \['size'\] \(PerGroup needs them\)")),
    case("front_ends-json-granularity-unknown-key", bad_json('"axis"', '"axes"'),
         Raises(r"rule 0.weight.granularity: unknown key\(s\) \['axes'\]; allowed: type, axis")),
    case("front_ends-json-quantizer-not-object", lambda: rules_from_json('[{"weight": "int4"}]'),
         Raises(r"rule 0.weight must be a JSON object, got 'int4'")),
    case("front_ends-json-path-not-str", bad_json('".*"', '7'),
         Raises(r"rule 0: Rule.path must be a str", TypeError)),
    case("front_ends-json-missing-granularity-defaults",
         lambda: rules_from_json('[{"weight": {"format": "int4"}}]'),
         Documented(check_rule(Rule(weight=Quantizer("int4"))),
                    "rules_from_json: a missing key takes its Python default, as Quantizer('int4')")),
    case("front_ends-json-types-a-string", lambda: rules_from_json('[{"types": "Dense"}]'),
         Documented(check_rule(Rule(types=("Dense",))),
                    "a single class name is one type, as in Rule(types=...)")),
]
