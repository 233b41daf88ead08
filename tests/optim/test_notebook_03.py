"""colab/03_8bit_optimizers.ipynb runs top to bottom in quick mode (QJAX_QUICK=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "colab" / "03_8bit_optimizers.ipynb"


@pytest.mark.slow
def test_notebook_03_executes_in_quick_mode(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install nbclient)")
    pytest.importorskip("ipykernel", reason="ipykernel not installed (pip install ipykernel)")
    monkeypatch.setenv("QJAX_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "quick mode" in outputs
    assert "restored bit for bit: True" in outputs
    assert "all absmaxes finite: True" in outputs
    assert "'0/mu/embed': 'float32'" in outputs and "'0/mu/dense': 'dynamic'" in outputs
