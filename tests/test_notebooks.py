"""Executes the notebooks under notebooks/ with small settings (JAXMPS_NOTEBOOK_SMALL=1), so a
broken notebook fails the suite; checks they are stored without outputs. Notebook 3 reads a
small results folder generated here with the benchmark harness (CPU rows present, GPU absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _execute(path: Path, monkeypatch, **env):
    """Runs every cell in a fresh kernel (cwd = notebooks/); raises on the first failing
    cell. The kernel inherits this process's environment: the repository on PYTHONPATH and
    JAXMPS_LIB_DIR as the tests have it."""
    monkeypatch.setenv("JAXMPS_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return notebook


def _text(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells
                   for output in cell.get("outputs", []))


def _figures(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells
               for output in cell.get("outputs", []))


def test_the_three_notebooks_exist_and_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_training.ipynb",
                                           "03_performance.ipynb"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


def test_quickstart(monkeypatch):
    notebook = _execute(ROOT / "notebooks" / "01_quickstart.ipynb", monkeypatch)
    text = _text(notebook)
    for op in ("instance_norm", "batch_norm", "spatial_norm", "local_contrast_norm",
               "cross_channel_norm", "conv2d", "conv_transpose2d", "fully_connected"):
        assert op in text  # each gradient was checked (the cell asserts the error bound)
    assert _figures(notebook) >= 7


def test_training(monkeypatch):
    notebook = _execute(ROOT / "notebooks" / "02_training.ipynb", monkeypatch)
    assert "held-out accuracy: native" in _text(notebook)
    assert _figures(notebook) >= 4


def _write_cpu_results(folder: Path):
    """A results file as `python -m jaxmps.bench --json` writes it, from the real harness on
    tiny stand-in callables (two sizes, both modes, with PyTorch-style timings)."""
    import jax.numpy as jnp

    from jaxmps.bench import harness

    cases = []
    for n in (1, 4):
        x = jnp.ones((n, 8, 8, 4))
        for mode in ("forward", "forward+backward"):
            cases.append(harness.Case(
                "instance_norm", mode, tuple(x.shape), "NHWC", "float32",
                dict(native=lambda x=x: x + 1, reference=lambda x=x: x * 2,
                     torch=lambda x=x: np.asarray(x) * 3), bytes=2 * x.size * 4))
    rows = harness.run_cases(cases, repeats=3, bandwidth=1e10, peak_flops=None)
    (folder / "cpu").mkdir(parents=True)
    with open(folder / "cpu" / "tiny.json", "w") as f:
        json.dump({"device": "test cpu", "bandwidth_Bps": 1e10, "results": rows}, f)


def test_performance_with_cpu_results_and_no_gpu_results(monkeypatch, tmp_path):
    _write_cpu_results(tmp_path)
    notebook = _execute(ROOT / "notebooks" / "03_performance.ipynb", monkeypatch,
                        JAXMPS_BENCH_DIR=str(tmp_path))
    text = _text(notebook)
    assert "CPU: 4 rows on test cpu" in text
    assert "GPU: no results committed" in text
    assert _figures(notebook) == 3  # time vs size, roofline fraction, ratios (CPU only)
