"""Bad input to qjax.summary: what is not a model or its variables; float, unfrozen and frozen models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qjax import PerChannel, Quantizer, Rule
from qjax import linen as ql
from qjax import nnx as qn
from qjax import summary as sm
from tests.bad_input.cases_front_ends import LinenMLP, NnxStack, X, linen
from tests.bad_input.table import Documented, Raises, case

W4 = Quantizer("int4", PerChannel(-1))


@functools.cache
def float_variables():
    return LinenMLP().init(jax.random.key(0), X)


def frozen_nnx_summary():
    model = NnxStack()
    qn.quantize_model(model, [Rule(r"layers/0", weight=W4, name="first")], X)
    qn.freeze(model)
    return sm.summary(model)


def check_float(s):
    assert {r.rule for r in s.layers} == {"-"} and {r.bits for r in s.layers} == {"float32:32"}
    assert s.real_bytes == s.theoretical_bytes == 4 * s.params > 0


def check_unfrozen(s):
    assert {r.rule for r in s.layers} == {".*"}, s.layers  # the rule each layer will be frozen with
    assert s.real_bytes == 4 * s.params  # nothing packed yet: float32 bytes


def check_frozen_nnx(s):
    rows = {r.path: r for r in s.layers}
    assert rows["layers/0"].rule == "first" and "int4:4" in rows["layers/0"].bits
    assert rows["layers/1"].rule == "-" and rows["layers/1"].bits == "float32:32"
    assert rows["layers/0"].real_bytes < 4 * rows["layers/0"].params


def check_printable(s):
    text = repr(s)
    assert text == str(s) and text.splitlines()[0].split()[:3] == ["layer", "rule", "bits"]
    assert text.splitlines()[-1].startswith("total") and "head" in text


def check_empty(s):
    assert s.layers == () and s.params == s.real_bytes == 0 and "total" in str(s)


CASES = [
    case("summary-not-a-model", lambda: sm.summary("model", {}),
         Raises(r"takes a qjax.linen.QuantizedModel \(with its variables\) or an NNX model, got str",
                TypeError)),
    case("summary-linen-without-variables", lambda: sm.summary(linen()[0]),
         Raises(r"summary\(qmodel, variables, \*inputs\) of a Linen model needs its variables")),
    case("summary-linen-variables-without-params", lambda: sm.summary(linen()[0], {"quant": {}}, X),
         Raises(r"needs its variables, a dict with a 'params' collection")),
    case("summary-linen-wrong-inputs", lambda: sm.summary(linen()[0], linen()[1], jnp.ones((2, 5))),
         Raises(r"cannot run on these variables and inputs \(ScopeParamShapeError")),
    case("summary-nnx-with-variables", lambda: sm.summary(NnxStack(), {"params": {}}),
         Raises(r"summary\(model\) of an NNX model takes no variables", TypeError)),
    case("summary-summarize-not-a-tree", lambda: sm.summarize([jnp.ones(3)]),
         Raises(r"summarize takes a params tree \(a dict\), got list", TypeError)),
    case("summary-summarize-non-array-leaf", lambda: sm.summarize({"dense": {"kernel": "int4"}}),
         Raises(r"a parameter must be an array or a QArray, got str", TypeError)),
    case("summary-summarize-empty", lambda: sm.summarize({}),
         Documented(check_empty, "an empty params tree: no rows, totals 0")),
    case("summary-plain-linen-model", lambda: sm.summary(LinenMLP(), float_variables(), X),
         Documented(check_float, "summary docstring: a model that is not quantized gets its float summary")),
    case("summary-nnx-float-model", lambda: sm.summary(NnxStack()),
         Documented(check_float, "summary docstring: an NNX model that is not quantized: float summary")),
    case("summary-linen-unfrozen", lambda: sm.summary(linen()[0], linen()[1], X),
         Documented(check_unfrozen, "unfrozen QAT variables: each layer's rule, float32 bits and bytes")),
    case("summary-linen-frozen-is-printable", lambda: sm.summary(linen()[0], linen()[2], X),
         Documented(check_printable, "README: summary returns a table; its str and repr are the table")),
    case("summary-linen-float-qmodel",
         lambda: sm.summary(ql.quantize_model(LinenMLP(), []), float_variables(), X),
         Documented(check_float, "no rules: every rule '-', float32 bits")),
    case("summary-nnx-frozen", frozen_nnx_summary,
         Documented(check_frozen_nnx, "frozen NNX layers report their format's bits and packed bytes")),
]
