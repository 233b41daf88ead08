"""The Colab notebooks run top to bottom (quick mode, results into a temporary folder)."""

import pytest
from _checks import REPO_ROOT, check_rows, load_rows, quick_env, require_experiment_deps

NOTEBOOKS = {  # notebook -> the results it writes
    "01_quickstart.ipynb": "quickstart",
    "02_binary_networks.ipynb": "02_binary_networks",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[notebooks]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient missing: pip install -e '.[notebooks]'")
    require_experiment_deps()
    for key, value in quick_env().items():  # the kernel inherits this environment
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QJAX_RESULTS_DIR", str(tmp_path))
    notebook = nbformat.read(REPO_ROOT / "colab" / name, as_version=4)
    assert "find_spec(\"qjax\") is None" in notebook.cells[1].source  # the guarded Colab install cell
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()
    rows = load_rows(tmp_path, NOTEBOOKS[name])
    check_rows(rows, fp32_floor=0.5)
