"""Orbax checkpoints of any qjax pytree: QAT params, frozen QArrays, 8-bit optimizer states.

``save(path, tree)`` writes the tree (its leaves arrays: ``jax.Array`` or numpy) with Orbax's PyTree
checkpointer, uncompressed (so the bytes on disk are the real bytes of the arrays, which :mod:`qjax.summary`
reports), plus ``qjax_manifest.json``: the key path, shape, dtype and SHA-256 of every leaf, and the SHA-256
of every file Orbax wrote. ``restore(path, target)`` reads it back into the structure of ``target`` (a tree
of arrays or ``jax.ShapeDtypeStruct``, with the same QArray nodes and shardings): it first checks the target
against the manifest and every file against its hash (so a damaged checkpoint never reaches Orbax, and
restoring it prints nothing), then checks every restored leaf, so a restored checkpoint is bit for bit
what was saved, or a :class:`CheckpointError` names the first file or leaf that is not.
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


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _check_leaves(tree, who: str, allowed=_is_array, what: str = "an array (jax.Array or numpy)") -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not allowed(leaf):
            raise TypeError(f"qjax.checkpoint.{who}: leaf {jax.tree_util.keystr(path)} is of type "
                            f"{type(leaf).__name__}; every leaf must be {what} (wrap a number: "
                            "jnp.asarray(x))")


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


def _file_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (relative names), the manifest excepted."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            digest = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
            out[f.relative_to(path).as_posix()] = digest.hexdigest()
    return out


def save(path: str | os.PathLike, tree, *, force: bool = False) -> Path:
    """Save ``tree`` (a pytree of arrays, at least one) to the directory ``path`` (absolute or relative);
    ``force`` overwrites an existing one (else it is a ``ValueError``)."""
    path = Path(path).absolute()
    _check_leaves(tree, "save")
    if not jax.tree_util.tree_leaves(tree):
        raise ValueError(f"qjax.checkpoint.save: the tree has no array leaves (got {tree!r:.200}); nothing "
                         "to save")
    if path.exists() and not force:
        raise ValueError(f"qjax.checkpoint.save: {path} already exists; pass force=True to overwrite it")
    _checkpointer().save(path, args=ocp.args.PyTreeSave(tree), force=force)
    manifest = {"format": 2, "leaves": _fingerprint(tree), "files": _file_hashes(path)}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _abstract(target):
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree_util.tree_map(leaf, target)


def _read_manifest(path: Path) -> tuple[dict, dict | None]:
    """``(leaves, files)`` of the manifest (``files`` is ``None`` for a manifest without file hashes)."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"no qjax checkpoint at {path}: {MANIFEST} is missing (not saved by "
                              "qjax.checkpoint.save, or the save did not finish)")
    try:
        manifest = json.loads(manifest_file.read_text())
        if "leaves" not in manifest:  # a manifest of leaves only
            manifest = {"leaves": manifest, "files": None}
        leaves, files = manifest["leaves"], manifest["files"]
        leaves = {k: {"shape": tuple(v["shape"]), "dtype": str(v["dtype"]), "sha256": str(v["sha256"])}
                  for k, v in leaves.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({type(err).__name__}: {err})") \
            from None
    return leaves, files


def restore(path: str | os.PathLike, target):
    """Restore the checkpoint at ``path`` into ``target``'s structure (leaves: arrays or
    ``jax.ShapeDtypeStruct``), verified against the manifest (module docstring)."""
    path = Path(path).absolute()
    manifest, files = _read_manifest(path)
    _check_leaves(target, "restore", lambda x: _is_array(x) or isinstance(x, jax.ShapeDtypeStruct),
                  "an array or a jax.ShapeDtypeStruct")
    abstract = _abstract(target)
    expected = {jax.tree_util.keystr(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
                for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    saved = {k: (v["shape"], v["dtype"]) for k, v in manifest.items()}
    if expected != saved:
        differ = sorted(k for k in set(expected) | set(saved) if expected.get(k) != saved.get(k))
        raise CheckpointError(f"checkpoint {path} does not match the target structure: leaves "
                              f"{differ[:4]} differ (saved {[saved.get(k) for k in differ[:4]]}, target "
                              f"{[expected.get(k) for k in differ[:4]]})")
    if files is not None:
        found = _file_hashes(path)
        damaged = sorted(f for f in files if found.get(f) != files[f])
        if damaged:
            what = "missing" if damaged[0] not in found else "changed"
            raise CheckpointError(f"checkpoint {path} is damaged: file {damaged[0]} is {what} since it was "
                                  f"saved ({len(damaged)} file(s) differ from their saved SHA-256)")
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
