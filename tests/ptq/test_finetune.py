"""PV-tuning's V step (top-tau re-rounding, codes on the grid), its P step (loss goes down) and the STE
baseline, on a small per-token MLP; every step jitted."""

import math

import jax
import numpy as np
import pytest

from qjax import PerChannel, PerGroup, QArray, Quantizer, Rule, quantize
from qjax.ptq import gptq, pv_tuning, requantize_subspace, ste_finetune, top_tau_mask
from qjax.qarray import unpack

W2 = [Rule(".*", types=("Dense",), weight=Quantizer("int2", PerGroup(0, 16), "minmax"), name="w2")]


def _codes(frozen):
    p = frozen["params"]
    return {name: np.asarray(unpack(p[name]["kernel"]).codes) for name in ("dense_0", "dense_1", "head")}


def test_top_tau_mask_counts():
    score = jax.random.uniform(jax.random.key(0), (40, 30))
    mask = jax.jit(top_tau_mask, static_argnums=1)(score, 0.01)
    assert int(mask.sum()) == math.ceil(0.01 * 1200)
    assert float(score[mask].min()) >= float(score[~mask].max())


@pytest.mark.parametrize("q", [Quantizer("int2", PerGroup(0, 16), "minmax"),
                               Quantizer("ternary", PerChannel(-1), "mean_abs")], ids=["int2", "ternary"])
def test_v_step_changes_at_most_tau_of_the_codes_and_stays_on_grid(q):
    w = jax.random.normal(jax.random.key(1), (64, 48))
    qa = quantize(q, w)
    buffer = w + 0.5 * jax.random.normal(jax.random.key(2), w.shape)  # far from the grid everywhere
    new = jax.jit(requantize_subspace, static_argnums=2)(qa, buffer, 0.05)
    changed = int(np.sum(np.asarray(new.codes) != np.asarray(qa.codes)))
    assert 0 < changed <= math.ceil(0.05 * w.size)
    lo, hi = q.fmt.lo, q.fmt.hi
    assert lo <= int(new.codes.min()) and int(new.codes.max()) <= hi and new.codes.dtype == qa.codes.dtype
    # the changed entries are exactly the nearest grid values of the buffer
    target = quantize(Quantizer(q.format, q.granularity, "given"), buffer, scale=qa.scale,
                      zero_point=qa.zero_point).codes
    moved = np.asarray(new.codes) != np.asarray(qa.codes)
    np.testing.assert_array_equal(np.asarray(new.codes)[moved], np.asarray(target)[moved])


def test_pv_tuning_lowers_the_loss_and_moves_few_codes(mlp):
    model, variables, batches = mlp
    start = gptq(model, variables, W2, batches)
    frozen, losses = pv_tuning(model, start, W2, batches, teacher=variables, steps=30, p_learning_rate=1e-3,
                               tau=0.01)
    assert len(losses) == 30 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    before, after = _codes(start), _codes(frozen)
    for name in before:
        changed = np.sum(before[name] != after[name])
        assert changed <= 30 * math.ceil(0.01 * before[name].size)  # at most tau per V step
        assert after[name].min() >= -2 and after[name].max() <= 1
    kernel = frozen["params"]["dense_1"]["kernel"]
    assert isinstance(kernel, QArray) and kernel.packing is not None


def test_a_nearly_exact_start_is_kept_when_tuning_adds_error(mlp):
    # int8 GPTQ is nearly exact: large normalized steps can only add error, and keep_best returns the start
    model, variables, batches = mlp
    w8 = [Rule(".*", types=("Dense",), weight=Quantizer("int8", PerChannel(-1)), name="w8")]
    start = gptq(model, variables, w8, batches)
    kw = dict(teacher=variables, steps=6, p_learning_rate=3e-2, v_learning_rate=0.3, tau=0.2)
    kept, losses = pv_tuning(model, start, w8, batches, **kw)
    moved, _ = pv_tuning(model, start, w8, batches, keep_best=False, **kw)
    assert losses[-1] > losses[0]
    for name, codes in _codes(start).items():
        np.testing.assert_array_equal(_codes(kept)[name], codes)
    assert any(np.any(_codes(moved)[n] != c) for n, c in _codes(start).items())


def test_p_step_alone_lowers_the_loss_with_codes_fixed(mlp):
    model, variables, batches = mlp
    start = gptq(model, variables, W2, batches)
    frozen, losses = pv_tuning(model, start, W2, batches[:1], teacher=variables, steps=15,
                               p_learning_rate=1e-3, v_learning_rate=0.0, tau=1e-9)
    assert losses[-1] < 0.9 * losses[0]
    # v_learning_rate 0 keeps the buffer at the start: re-rounding it moves at most one code per step
    before, after = _codes(start), _codes(frozen)
    assert all(np.sum(before[n] != after[n]) <= 15 for n in before)
    scale_before = unpack(start["params"]["head"]["kernel"]).scale
    assert not np.allclose(unpack(frozen["params"]["head"]["kernel"]).scale, scale_before)


def test_ste_finetune_lowers_the_loss(mlp):
    model, variables, batches = mlp
    frozen, losses = ste_finetune(model, variables, W2, batches, steps=30, learning_rate=3e-3)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    kernel = frozen["params"]["dense_0"]["kernel"]
    assert isinstance(kernel, QArray) and kernel.format == "int2"


def test_finetune_errors(mlp):
    model, variables, batches = mlp
    frozen = gptq(model, variables, W2, batches[:1])
    with pytest.raises(ValueError, match="pass teacher="):
        pv_tuning(model, frozen, W2, batches, steps=1)
    with pytest.raises(ValueError, match="tau=0"):
        pv_tuning(model, variables, W2, batches, steps=1, tau=0)
    with pytest.raises(ValueError, match="steps=-1"):
        ste_finetune(model, variables, W2, batches, steps=-1)
    with pytest.raises(ValueError, match="same length"):
        pv_tuning(model, variables, W2, [batches[0], {k: v[:2] for k, v in batches[1].items()}], steps=1)
    nf4 = [Rule(".*", types=("Dense",), weight=Quantizer("nf4", PerChannel(-1)))]
    with pytest.raises(ValueError, match="scalar integer grids"):
        pv_tuning(model, variables, nf4, batches, steps=1)
