"""Summary: per-layer bits, counts, theoretical and real bytes; total within 5% of the checkpoint on disk."""

import flax.linen as nn
import jax
import pytest

from qjax import PerChannel, PerGroup, Quantizer
from qjax import checkpoint as ck
from qjax import linen as ql
from qjax import summary as sm
from qjax.rules import Rule


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(1024, name="hidden")(x))
        return nn.Dense(16, name="head")(x)


X = jax.random.normal(jax.random.key(1), (2, 2048))


@pytest.mark.parametrize("quantizer,bits", [
    (Quantizer("int8", PerChannel(-1)), 8), (Quantizer("int4", PerGroup(0, 128)), 4),
    (Quantizer("ternary", PerChannel(-1), "mean_abs"), 2),
    (Quantizer("binary", PerChannel(-1), "mean_abs"), 1),
])
def test_summary_rows_and_disk_size(quantizer, bits, tmp_path):
    qmodel = ql.quantize_model(Net(), [Rule("hidden", weight=quantizer, name="hidden-rule")])
    variables = qmodel.init(jax.random.key(0), X)
    frozen = ql.freeze(qmodel, variables, X)
    s = sm.summary(qmodel, frozen, X)
    hidden, head = s.layers
    assert hidden.rule == "hidden-rule" and head.rule == "-"
    assert hidden.params == 2048 * 1024 + 1024 and head.params == 1024 * 16 + 16
    assert hidden.theoretical_bytes == 2048 * 1024 * bits / 8 + 1024 * 4
    assert hidden.bits == ", ".join(sorted([f"{quantizer.format}:{bits}", "float32:32"]))
    hidden_leaves = jax.tree_util.tree_leaves(frozen["params"]["hidden"])
    assert hidden.real_bytes == sum(leaf.nbytes for leaf in hidden_leaves)
    float_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(variables["params"]))
    assert s.real_bytes < float_bytes * (bits + 1) / 32
    disk = ck.disk_bytes(ck.save(tmp_path / "frozen", frozen))
    assert abs(disk - s.real_bytes) <= 0.05 * s.real_bytes, (disk, s.real_bytes)
    text = str(s)
    assert "hidden-rule" in text and "total" in text.splitlines()[-1]
    assert repr(s) == text  # what a notebook shows is the table


def test_float_model_summary():
    params = Net().init(jax.random.key(0), X)["params"]
    s = sm.summarize(params)
    assert s.real_bytes == s.theoretical_bytes == 4 * s.params


def test_nnx_summary_matches_linen_and_reads_packed_weights():
    from flax import nnx

    from qjax import nnx as qn

    class NnxNet(nnx.Module):
        def __init__(self, rngs):
            self.hidden, self.head = nnx.Linear(2048, 1024, rngs=rngs), nnx.Linear(1024, 16, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.hidden(x)))

    rules = [Rule("hidden", weight=Quantizer("int4", PerGroup(0, 128)), name="hidden-rule")]
    model = NnxNet(nnx.Rngs(0))
    qn.quantize_model(model, rules, X)
    before = sm.summary(model)
    assert {r.path: r.rule for r in before.layers} == {"hidden": "hidden-rule", "head": "-"}
    assert before.real_bytes == 4 * before.params
    qn.freeze(model)
    s = sm.summary(model)
    qmodel = ql.quantize_model(Net(), rules)
    linen = sm.summary(qmodel, ql.freeze(qmodel, qmodel.init(jax.random.key(0), X), X), X)
    rows = lambda summary: {r.path: (r.rule, r.bits, r.params, r.real_bytes) for r in summary.layers}
    assert rows(s) == rows(linen)
