"""Orbax checkpoints: QAT params and frozen packed params restore bit for bit; damage is reported."""

import gc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import PerChannel, PerGroup, Quantizer
from qjax import checkpoint as ck
from qjax import linen as ql
from qjax.rules import Rule


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(128)(x)


X = jax.random.normal(jax.random.key(1), (2, 512))
RULES = [Rule(r"Dense_0", weight=Quantizer("int4", PerGroup(0, 128))),
         Rule(r"Dense_1", weight=Quantizer("binary", PerChannel(-1), "learned", "biper"))]


@pytest.fixture(scope="module")
def trained():
    qmodel = ql.quantize_model(Net(), RULES)
    variables = qmodel.init(jax.random.key(0), X)
    variables["params"]["Dense_0"]["bias"] = variables["params"]["Dense_0"]["bias"].astype(jnp.bfloat16)
    return qmodel, variables, ql.freeze(qmodel, variables, X)


def equal_bits(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    as_bytes = lambda x: np.asarray(x).view(np.uint8)
    pairs = zip(la, lb, strict=True)
    return all(x.dtype == y.dtype and np.array_equal(as_bytes(x), as_bytes(y)) for x, y in pairs)


@pytest.mark.parametrize("which", ["qat", "frozen"])
def test_round_trip_bit_for_bit(trained, which, tmp_path):
    qmodel, variables, frozen = trained
    tree = variables if which == "qat" else frozen
    path = ck.save(tmp_path / "ckpt", tree)
    restored = ck.restore(path, tree)
    assert equal_bits(restored, tree)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    assert equal_bits(ck.restore(path, abstract), tree)
    np.testing.assert_array_equal(qmodel.apply(restored, X), qmodel.apply(tree, X))


def _largest_data_file(path):
    files = [f for f in path.rglob("*") if f.is_file() and f.name != ck.MANIFEST]
    return max(files, key=lambda f: f.stat().st_size)


def test_corrupt_checkpoint_is_detected(trained, tmp_path):
    _, _, frozen = trained
    path = ck.save(tmp_path / "ckpt", frozen)
    victim = _largest_data_file(path)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=r"checkpoint .*(SHA-256|cannot be read)"):
        ck.restore(path, frozen)


def test_truncated_checkpoint_is_detected(trained, tmp_path):
    _, _, frozen = trained
    path = ck.save(tmp_path / "ckpt", frozen)
    victim = _largest_data_file(path)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    with pytest.raises(ck.CheckpointError, match=r"checkpoint .*(cannot be read|SHA-256)"):
        ck.restore(path, frozen)


def test_missing_manifest_and_wrong_target(trained, tmp_path):
    _, variables, frozen = trained
    with pytest.raises(ck.CheckpointError, match=r"qjax_manifest\.json is missing"):
        ck.restore(tmp_path / "nothing-here", frozen)
    path = ck.save(tmp_path / "ckpt", frozen)
    with pytest.raises(ck.CheckpointError, match="does not match the target structure"):
        ck.restore(path, variables)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_raises_one_error_and_prints_nothing(trained, tmp_path, capfd, caplog, damage):
    _, _, frozen = trained
    path = ck.save(tmp_path / "ckpt", frozen)
    capfd.readouterr()
    caplog.clear()
    for victim in [f for f in path.rglob("*") if f.is_file() and f.name != ck.MANIFEST]:
        if damage == "delete":
            victim.unlink()
        elif damage == "truncate":
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        else:
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=r"is damaged: file .* is (changed|missing) since it was "):
        ck.restore(path, frozen)
    gc.collect()  # an unretrieved task or a callback on a closed event loop would report here
    out, err = capfd.readouterr()
    assert out == err == "" and not caplog.records, (out, err, caplog.records)


def test_save_refuses_what_orbax_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="no array leaves"):
        ck.save(tmp_path / "empty", {})
    with pytest.raises(TypeError, match=r"leaf \['n'\] is of type int"):
        ck.save(tmp_path / "number", {"n": 3})
    path = ck.save(tmp_path / "ckpt", {"n": jnp.ones(3)})
    with pytest.raises(ValueError, match="already exists; pass force=True"):
        ck.save(path, {"n": jnp.ones(3)})
    ck.save(path, {"n": jnp.zeros(3)}, force=True)
    np.testing.assert_array_equal(ck.restore(path, {"n": jnp.ones(3)})["n"], jnp.zeros(3))
