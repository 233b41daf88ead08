"""colab/04_packed_kernels.ipynb runs top to bottom in quick mode (QJAX_QUICK=1) on this machine."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_notebook_04_runs_top_to_bottom(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[notebooks]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient missing: pip install -e '.[notebooks]'")
    pytest.importorskip("ipykernel", reason="ipykernel missing: pip install -e '.[notebooks]'")
    monkeypatch.setenv("QJAX_QUICK", "1")
    notebook = nbformat.read(ROOT / "colab" / "04_packed_kernels.ipynb", as_version=4)
    assert "find_spec(\"qjax\") is None" in notebook.cells[1].source  # the guarded Colab install cell
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))
    assert "quick mode" in text and "word 0: " in text
    assert "binary" in text and "vs bf16" in text
    error = float(text.split("max |interpret - dequantized matmul| =")[1].split()[0])
    assert error < 1e-4
    assert "interpret: max |y - y_xla| =" in text
    assert "time / f32 dot" in text or "speedup vs bf16" in text
