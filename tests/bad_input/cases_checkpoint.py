"""Bad input to qjax.checkpoint: what cannot be saved, targets that do not fit, damaged checkpoints."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qjax import PerGroup, Quantizer, quantize
from qjax import checkpoint as ck
from tests.bad_input.table import Documented, Raises, case

W = jnp.linspace(-1.0, 1.0, 64 * 8).reshape(64, 8)
TREE = {"w": quantize(Quantizer("int4", PerGroup(0, 32)), W).pack(0),
        "b": jnp.arange(8, dtype=jnp.bfloat16), "step": jnp.asarray(3, jnp.int32)}


def fresh() -> Path:
    return Path(tempfile.mkdtemp(prefix="qjax-bad-input-")) / "ckpt"


@functools.cache
def saved() -> Path:
    """One checkpoint of TREE, never changed (rows that damage a checkpoint save their own)."""
    return ck.save(fresh(), TREE)


def data_files(path: Path) -> list[Path]:
    return sorted((f for f in path.rglob("*") if f.is_file() and f.name != ck.MANIFEST),
                  key=lambda f: f.stat().st_size)


def damaged(how):
    def call():
        path = ck.save(fresh(), TREE)
        how(path, data_files(path)[-1])
        return ck.restore(path, TREE)
    return call


def flip_byte(path, victim):
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


def write_manifest(text):
    def call():
        path = ck.save(fresh(), TREE)
        (path / ck.MANIFEST).write_text(text)
        return ck.restore(path, TREE)
    return call


def leaves_only_manifest():
    """A checkpoint whose manifest lists leaves only (no file hashes) still restores, verified by leaf."""
    path = ck.save(fresh(), TREE)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    (path / ck.MANIFEST).write_text(json.dumps(manifest["leaves"]))
    return ck.restore(path, TREE)


def overwrite():
    path = ck.save(fresh(), TREE)
    other = {**TREE, "b": TREE["b"] + 1}
    ck.save(path, other, force=True)
    return ck.restore(path, other), other


def bit_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    same = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    as_bytes = lambda x: np.atleast_1d(np.asarray(x)).view(np.uint8)
    return same and all(x.dtype == y.dtype and np.array_equal(as_bytes(x), as_bytes(y))
                        for x, y in zip(la, lb, strict=True))


def check_equals_tree(restored):
    assert bit_equal(restored, TREE)


def check_overwritten(result):
    restored, other = result
    assert bit_equal(restored, other)


ABSTRACT = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), TREE)

CASES = [
    case("checkpoint-save-empty-tree", lambda: ck.save(fresh(), {}),
         Raises(r"the tree has no array leaves \(got \{\}\); nothing to save")),
    case("checkpoint-save-none", lambda: ck.save(fresh(), None), Raises(r"no array leaves \(got None\)")),
    case("checkpoint-save-str-leaf", lambda: ck.save(fresh(), {"name": "int4"}),
         Raises(r"leaf \['name'\] is of type str; every leaf must be an array", TypeError)),
    case("checkpoint-save-python-number", lambda: ck.save(fresh(), {"step": 3}),
         Raises(r"leaf \['step'\] is of type int; every leaf must be an array .*jnp.asarray", TypeError)),
    case("checkpoint-save-existing-dir", lambda: ck.save(saved(), TREE),
         Raises(r"already exists; pass force=True to overwrite it")),
    case("checkpoint-save-force-overwrites", overwrite,
         Documented(check_overwritten, "save(force=True) replaces the checkpoint; restore gives the new "
                                       "tree")),
    case("checkpoint-restore-missing-dir", lambda: ck.restore(fresh(), TREE),
         Raises(r"no qjax checkpoint at .*qjax_manifest\.json is missing", ck.CheckpointError)),
    case("checkpoint-restore-wrong-structure", lambda: ck.restore(saved(), {"w": TREE["w"]}),
         Raises(r"does not match the target structure: leaves .*\['b'\]", ck.CheckpointError)),
    case("checkpoint-restore-dtype-mismatch",
         lambda: ck.restore(saved(), {**TREE, "b": TREE["b"].astype("float32")}),
         Raises(r"leaves \[\"\['b'\]\"\] differ \(saved \[\(\(8,\), 'bfloat16'\)\], target \[\(\(8,\), "
                r"'float32'\)\]", ck.CheckpointError)),
    case("checkpoint-restore-shape-mismatch",
         lambda: ck.restore(saved(), {**TREE, "b": jnp.zeros(9, jnp.bfloat16)}),
         Raises(r"differ \(saved \[\(\(8,\), 'bfloat16'\)\], target \[\(\(9,\), 'bfloat16'\)\]",
                ck.CheckpointError)),
    case("checkpoint-restore-target-none", lambda: ck.restore(saved(), None),
         Raises(r"does not match the target structure.*target \[None, None", ck.CheckpointError)),
    case("checkpoint-restore-target-str-leaf", lambda: ck.restore(saved(), {**TREE, "step": "3"}),
         Raises(r"restore: leaf \['step'\] is of type str; every leaf must be an array or a "
                r"jax.ShapeDtypeStruct", TypeError)),
    case("checkpoint-restore-flipped-byte", damaged(flip_byte),
         Raises(r"is damaged: file .* is changed since it was saved", ck.CheckpointError)),
    case("checkpoint-restore-truncated-file",
         damaged(lambda path, f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])),
         Raises(r"is damaged: file .* is changed since it was saved", ck.CheckpointError)),
    case("checkpoint-restore-deleted-file", damaged(lambda path, f: f.unlink()),
         Raises(r"is damaged: file .* is missing since it was saved", ck.CheckpointError)),
    case("checkpoint-restore-corrupt-manifest", write_manifest("{not json"),
         Raises(r"qjax_manifest\.json is corrupt", ck.CheckpointError)),
    case("checkpoint-restore-manifest-wrong-shape", write_manifest("[1, 2]"),
         Raises(r"qjax_manifest\.json is corrupt", ck.CheckpointError)),
    case("checkpoint-round-trip-qarray", lambda: ck.restore(saved(), TREE),
         Documented(check_equals_tree, "qjax.checkpoint: restore is bit for bit what was saved (QArray, "
                                       "bfloat16, int32 leaves)")),
    case("checkpoint-round-trip-abstract-target", lambda: ck.restore(saved(), ABSTRACT),
         Documented(check_equals_tree, "restore(path, target): target leaves may be jax.ShapeDtypeStruct")),
    case("checkpoint-restore-leaves-only-manifest", leaves_only_manifest,
         Documented(check_equals_tree, "a manifest without file hashes is verified leaf by leaf")),
]
