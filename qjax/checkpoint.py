"""Orbax checkpoints of any qjax pytree: QAT params, frozen QArrays, 8-bit optimizer states.

``save(path, tree)`` writes the tree with Orbax's PyTree checkpointer, uncompressed (so the bytes on disk are
the real bytes of the arrays, which :mod:`qjax.summary` reports), plus ``qjax_manifest.json``: the
key path, shape, dtype and SHA-256 of every leaf. ``restore(path, target)`` reads it back into the
structure of ``target`` (a tree of arrays or ``jax.ShapeDtypeStruct``, with the same QArray nodes and
shardings) and checks every leaf against the manifest, so a restored checkpoint is bit for bit what was
saved, or a :class:`CheckpointError` names the first leaf that is not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

MANIFEST = "qjax_manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, or does not match the target structure."""


def _fingerprint(tree) -> dict[str, dict]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(jax.device_get(leaf))
        out[jax.tree_util.keystr(path)] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "sha256": hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).tobytes()).hexdigest(),
        }
    return out


def save(path: str | os.PathLike, tree, *, force: bool = False) -> Path:
    """Save ``tree`` to the directory ``path`` (absolute or relative); ``force`` overwrites."""
    path = Path(path).absolute()
    _checkpointer().save(path, args=ocp.args.PyTreeSave(tree), force=force)
    (path / MANIFEST).write_text(json.dumps(_fingerprint(tree), indent=1))
    return path


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _abstract(target):
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree_util.tree_map(leaf, target)


def restore(path: str | os.PathLike, target):
    """Restore the checkpoint at ``path`` into ``target``'s structure, verified against the manifest."""
    path = Path(path).absolute()
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"no qjax checkpoint at {path}: {MANIFEST} is missing (not saved by "
                              "qjax.checkpoint.save, or the save did not finish)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({err})") from None
    abstract = _abstract(target)
    expected = {jax.tree_util.keystr(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
                for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    saved = {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest.items()}
    if expected != saved:
        differ = sorted(k for k in set(expected) | set(saved) if expected.get(k) != saved.get(k))
        raise CheckpointError(f"checkpoint {path} does not match the target structure: leaves "
                              f"{differ[:4]} differ (saved {[saved.get(k) for k in differ[:4]]}, target "
                              f"{[expected.get(k) for k in differ[:4]]})")
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        restored = _checkpointer().restore(path, args=ocp.args.PyTreeRestore(abstract, restore_args))
    except Exception as err:  # orbax/tensorstore raise many types for truncated or damaged files
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or damaged?): "
                              f"{type(err).__name__}: {str(err)[:300]}") from err
    for key, entry in _fingerprint(restored).items():
        if entry["sha256"] != manifest[key]["sha256"]:
            raise CheckpointError(f"checkpoint {path}: leaf {key} does not match its saved SHA-256 "
                                  "(the files were changed or damaged after saving)")
    return restored


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of all files under ``path`` (the checkpoint's real size on disk, metadata included)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
