"""Data sets for the experiments, as numpy arrays, with no download when a local copy exists.

- :func:`load_fashion_mnist`: the four IDX files of Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), looked up in
  ``$QJAX_DATA`` (or its ``fashion-mnist/`` folder), then ``/usr/share/datasets/fashion-mnist/`` (Debian
  package ``dataset-fashion-mnist``), then downloaded from the dataset's official address into
  ``$QJAX_DATA`` (or ``~/.cache/qjax/fashion-mnist``). Every file is checked: upstream's MD5 of the ``.gz``,
  or the SHA-256 of the decompressed IDX bytes (which survives Debian's re-compression). Uncompressed IDX
  files (no ``.gz``) are accepted by the SHA-256. The loader prints which copy it used.
- :func:`load_digits`: scikit-learn's embedded 8x8 digits, a stratified 80/20 split.

Both return ``(x_train, y_train, x_test, y_test)``: images ``(n, h, w)`` in their raw range (uint8 0..255
for Fashion-MNIST, float 0..16 for digits) and integer labels 0..9.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {  # IDX name: (MD5 of upstream's .gz, SHA-256 of the decompressed bytes)
    "train-images-idx3-ubyte": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train-labels-idx1-ubyte": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "t10k-images-idx3-ubyte": (
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "t10k-labels-idx1-ubyte": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}


class DataError(ValueError):
    """Data a job needs that is missing or fails its checksum; the message is one line saying how to get it
    (:func:`experiments.cli.run` prints it instead of a traceback)."""


HOW_TO_GET = ("install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) "
              "or set QJAX_DATA to a folder holding its four IDX files")


def _verified_idx(path: Path, name: str) -> bytes:
    """The IDX bytes of ``path`` (``.gz`` or raw) if it passes its checksum, else :class:`DataError`."""
    md5, sha256 = FASHION_MNIST_FILES[name]
    raw = path.read_bytes()
    if path.suffix == ".gz" and hashlib.md5(raw, usedforsecurity=False).hexdigest() == md5:
        return gzip.decompress(raw)
    data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{path} fails its checksum (expected MD5 {md5} of the .gz or SHA-256 {sha256} of "
            f"the IDX bytes): a damaged or different file; remove it and {HOW_TO_GET}"
        )
    return data


def parse_idx(data: bytes) -> np.ndarray:
    """An IDX file (magic ``0 0 8 ndim``, big-endian int32 dims, uint8 data) as a numpy array."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"not a uint8 IDX file (magic {data[:4]!r}, expected 0x00 0x00 0x08 <ndim>)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _local_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("QJAX_DATA"):
        root = Path(os.environ["QJAX_DATA"])
        dirs += [root, root / "fashion-mnist"]
    return [*dirs, FASHION_MNIST_DEBIAN]


def _find(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)


def _download_dir() -> Path:
    root = os.environ.get("QJAX_DATA")
    return Path(root) / "fashion-mnist" if root else Path.home() / ".cache" / "qjax" / "fashion-mnist"


def _download(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = folder / f"{name}.gz"
        if target.is_file():
            continue
        print(f"fashion-mnist: downloading {FASHION_MNIST_URL}{name}.gz -> {target}", file=sys.stderr)
        partial = target.with_suffix(".part")
        try:
            urllib.request.urlretrieve(f"{FASHION_MNIST_URL}{name}.gz", partial)
        except OSError as err:  # URLError (offline, DNS), HTTPError, a full disk
            partial.unlink(missing_ok=True)
            raise DataError(f"Fashion-MNIST is not in {', '.join(map(str, _local_dirs()))} and its download "
                            f"from {FASHION_MNIST_URL} failed ({type(err).__name__}: "
                            f"{getattr(err, 'reason', err)}): {HOW_TO_GET}") from None
        partial.rename(target)


def fashion_mnist_source(download: bool = True) -> Path:
    """The folder the four verified Fashion-MNIST files are read from (see the module docstring)."""
    for folder in [*_local_dirs(), _download_dir()]:
        paths = [_find(folder, name) for name in FASHION_MNIST_FILES]
        if all(paths):
            for path, name in zip(paths, FASHION_MNIST_FILES, strict=True):
                _verified_idx(path, name)
            return folder
    if not download:
        searched = ", ".join(str(d) for d in [*_local_dirs(), _download_dir()])
        raise DataError(f"Fashion-MNIST not found in {searched}: {HOW_TO_GET}, or allow the download")
    _download(_download_dir())
    return fashion_mnist_source(download=False)


def load_fashion_mnist(download: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: uint8 images ``(60000 | 10000, 28, 28)``, uint8 labels."""
    folder = fashion_mnist_source(download)
    print(f"fashion-mnist: using {folder}", file=sys.stderr)
    arrays = [parse_idx(_verified_idx(_find(folder, name), name)) for name in FASHION_MNIST_FILES]
    return arrays[0], arrays[1], arrays[2], arrays[3]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` of scikit-learn's 1797 8x8 digits (values 0..16), stratified."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test
