"""``colab/05_ptq_minilm.ipynb`` runs top to bottom in quick mode (results into a temporary folder)."""

import pytest

from tests.experiments._checks import REPO_ROOT, load_rows, quick_env, require_experiment_deps
from tests.ptq.minilm_checks import check_minilm_rows, require_minilm

pytestmark = pytest.mark.slow


def test_notebook_05_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[notebooks]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient missing: pip install -e '.[notebooks]'")
    require_experiment_deps()
    require_minilm()
    for key, value in quick_env().items():  # the kernel inherits this environment
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QJAX_RESULTS_DIR", str(tmp_path))
    notebook = nbformat.read(REPO_ROOT / "colab" / "05_ptq_minilm.ipynb", as_version=4)
    assert "find_spec(\"qjax\") is None" in notebook.cells[1].source  # the guarded Colab install cell
    client = nbclient.NotebookClient(notebook, timeout=400, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()
    rows = load_rows(tmp_path, "ptq_minilm")
    assert [(r["setting"], r["method"]) for r in rows] == [("fp32", "fp32")] + [
        ("W2 g64", m) for m in ("rtn", "gptq", "ste", "pv")]
    check_minilm_rows(rows)
    md = (tmp_path / "ptq_minilm.md").read_text()
    assert "| setting | method | cosine to fp32 |" in md and "quick mode" in md
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "GPTQ output error" in outputs
    assert "PV > STE > GPTQ > RTN" in outputs and "hold" in outputs  # the study's verdict line
