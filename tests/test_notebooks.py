"""The notebooks under notebooks/: each .ipynb is its jupytext py:percent twin, and each runs top
to bottom on CPU with tiny settings (a 4-layer random Llama with a real tokenizer)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import have
from eval.run_notebooks import NAMES
from tiny_lm import make_tiny_model

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _code_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "code"]


def test_every_notebook_is_listed_and_paired():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == sorted(NAMES)
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.skipif(not have("jupytext"), reason="jupytext not installed")
@pytest.mark.parametrize("name", NAMES)
def test_ipynb_matches_its_py_percent_twin(name):
    import jupytext

    from_py = jupytext.read(NOTEBOOKS / f"{name}.py")
    stored = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    assert _code_cells(stored) == [c.source for c in from_py.cells if c.cell_type == "code"], \
        f"notebooks/{name}.ipynb is out of date: jupytext --sync notebooks/{name}.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("nb") / "tiny", n_layers=4, dim=64)


# quickstart and kernels run in the default set; the three that train, quantize or ablate are `slow`
# quickstart in the default run, the others (8-30 s each on 2 cores) in the slow one
RUN = [n if n == "quickstart" else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


@pytest.mark.parametrize("name", RUN)
def test_notebook_runs_on_cpu(name, tiny, tmp_path, monkeypatch):
    env = {"FLASHIT_JAX_NB_MODEL": str(tiny), "FLASHIT_JAX_NB_SMALL": "1", "FLASHIT_JAX_NB_OUT": str(tmp_path),
           "JAX_PLATFORMS": "cpu", "JAX_NUMPY_DTYPE_PROMOTION": "strict", "MPLBACKEND": "Agg"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    path = NOTEBOOKS / f"{name}.ipynb"
    if have("nbclient") and have("ipykernel"):
        import nbformat
        from nbclient import NotebookClient

        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    else:  # no Jupyter here: the code cells, in order, as one script from the notebook's folder
        script = tmp_path / f"{name}.py"
        script.write_text("\n\n".join(_code_cells(json.loads(path.read_text()))))
        r = subprocess.run([sys.executable, str(script)], cwd=NOTEBOOKS, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # 18 s on 2 cores (2026-12-06): the quickstart notebook still runs in the default set
@pytest.mark.skipif(not (have("nbclient") and have("ipykernel")), reason="nbclient/ipykernel not installed")
def test_run_notebooks_records_success_and_the_failing_cells_error(tiny, tmp_path, monkeypatch):
    """eval.run_notebooks (the accelerator run of the notebooks) saves each executed notebook and a
    summary; a failure is reported with the failing cell's own exception, not nbclient's wrapper."""
    from eval.run_notebooks import main

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert main(["--names", "quickstart", "--model", str(tiny), "--small", "quickstart", "--out", str(tmp_path / "a")]) == 0
    ok = json.loads((tmp_path / "a" / "run.json").read_text())["results"]
    assert [r["ok"] for r in ok] == [True] and "backend: cpu" in ok[0]["runtime"]
    assert (tmp_path / "a" / "quickstart.ipynb").exists()
    assert main(["--names", "quickstart", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 1
    bad = json.loads((tmp_path / "b" / "run.json").read_text())["results"][0]
    assert not bad["ok"] and bad["error"].startswith("FlashitError") and "missing" in bad["error"]
