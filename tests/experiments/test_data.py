"""experiments.data: Fashion-MNIST from $QJAX_DATA or the Debian package with checksums; digits."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from experiments import data


def _debian_available() -> bool:
    return all((data.FASHION_MNIST_DEBIAN / f"{name}.gz").is_file() for name in data.FASHION_MNIST_FILES)


def test_parse_idx_reads_dims_and_rejects_other_files():
    blob = b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    np.testing.assert_array_equal(data.parse_idx(blob), np.arange(6, dtype=np.uint8).reshape(2, 3))
    with pytest.raises(data.DataError, match="not a uint8 IDX file"):
        data.parse_idx(b"PK\x03\x04")


@pytest.mark.skipif(not _debian_available(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.delenv("QJAX_DATA", raising=False)
    assert data.fashion_mnist_source(download=False) == data.FASHION_MNIST_DEBIAN
    x_train, y_train, x_test, y_test = data.load_fashion_mnist(download=False)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28) and x_train.dtype == np.uint8
    assert sorted(np.unique(y_train)) == list(range(10)) and y_test.shape == (10000,)


@pytest.mark.skipif(not _debian_available(), reason="Debian package dataset-fashion-mnist not installed")
def test_qjax_data_comes_first_and_a_damaged_copy_is_refused(tmp_path, monkeypatch):
    for name in data.FASHION_MNIST_FILES:  # uncompressed copies are accepted by their SHA-256
        raw = gzip.decompress((data.FASHION_MNIST_DEBIAN / f"{name}.gz").read_bytes())
        (tmp_path / name).write_bytes(raw)
    monkeypatch.setenv("QJAX_DATA", str(tmp_path))
    assert data.fashion_mnist_source(download=False) == tmp_path
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x07")
    with pytest.raises(data.DataError, match="fails its checksum"):
        data.fashion_mnist_source(download=False)


def test_missing_data_without_download_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("QJAX_DATA", str(tmp_path))
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN", tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="not found in"):
        data.fashion_mnist_source(download=False)


def test_digits_split():
    pytest.importorskip("sklearn", reason="scikit-learn missing: pip install -e '.[experiments]'")
    x_train, _, x_test, y_test = data.load_digits()
    assert x_train.shape[1:] == (8, 8) and len(x_train) + len(x_test) == 1797 and x_train.max() == 16
    assert set(np.unique(y_test)) == set(range(10))
