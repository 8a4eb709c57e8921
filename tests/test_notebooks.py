"""The numbered notebooks run top to bottom, in a kernel of this interpreter, on the demo
pipeline's outputs (working directory = its root, MLflow = its store), show what they
promise and write nothing into the project; they are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from conftest import REPO

from socialmae import reports

NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_data_overview.ipynb", "02_reconstructions.ipynb", "03_results_tables.ipynb")
EXECUTED = "-executed"  # suffix of the copies `jupyter-execute --output` writes (README)


def _outputs(notebook: nbformat.NotebookNode, tag: str) -> list[dict]:
    cells = [c for c in notebook.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert cells, f"no cell tagged {tag!r}"
    return [o for c in cells for o in c.get("outputs", [])]


def _text(outputs: list[dict]) -> str:
    parts = [o.get("text", "") for o in outputs]
    for o in outputs:
        data = o.get("data", {})
        parts += [data.get(kind, "") for kind in ("text/plain", "text/html", "text/markdown")]
    return "\n".join(parts)


def _images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def _files(root: Path) -> set[Path]:
    """The project's files, Python's bytecode cache aside."""
    return {
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_notebooks_are_numbered_and_committed_without_outputs():
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if not p.stem.endswith(EXECUTED))
    assert tuple(found) == NAMES == tuple(CHECKS), "every notebook is numbered and checked"
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata["kernelspec"]["name"] == "python3"
        for cell in notebook.cells:
            assert "execution" not in cell.metadata, name
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_the_demo_outputs(name, demo_pipeline, monkeypatch):
    root = demo_pipeline
    monkeypatch.delenv(reports.PROJECT_ENV, raising=False)  # found from the working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    before = _files(root)
    notebook = reports.execute_notebook(NOTEBOOKS / name, root, timeout=300)
    assert _files(root) == before, "the notebook wrote into the project"
    CHECKS[name](notebook, root)


def _check_data_overview(notebook: nbformat.NotebookNode, root: Path) -> None:
    splits = _text(_outputs(notebook, "splits"))
    assert all(word in splits for word in ("demo", "train", "val", "test", "speakers"))
    assert "passed" in _text(_outputs(notebook, "validation"))
    assert _images(_outputs(notebook, "figure")) == 3  # distributions, balance, face grid


def _check_reconstructions(notebook: nbformat.NotebookNode, root: Path) -> None:
    assert _images(_outputs(notebook, "fig2")) == 4  # two validation and two test clips
    assert _images(_outputs(notebook, "fig2-stage")) == 1
    assert _images(_outputs(notebook, "loss-curves")) == 1
    summary = _text(_outputs(notebook, "summary"))
    assert "loss_mae_video" in summary and "initial" in summary


def _check_results(notebook: nbformat.NotebookNode, root: Path) -> None:
    table = json.loads((root / "outputs/finetune/demo/metrics.json").read_text())
    project = _text(_outputs(notebook, "table-project"))
    modes = _text(_outputs(notebook, "table-modes"))
    assert "demo" in project and reports.OURS in project
    for mode in ("multimodal", "audio", "video"):
        test = table[mode]["test"]
        low, high = test["f1_macro_ci95"]
        # the stage's primary metric and its interval, recomputed from the run's predictions
        assert f"{test['f1_macro']:.3f} [{low:.3f}, {high:.3f}]" in project, mode
        assert f"{test['f1_micro']:.3f}" in project
        assert f"{test['f1_macro']:.3f} [{low:.3f}, {high:.3f}]" in modes, mode
    p_value = table["comparisons"]["multimodal_vs_audio"]["p_value"]
    assert f"{p_value:.3g}" in modes
    for tag, paper_row in (("table-cremad", "VAVL [17] (paper)"),
                           ("table-firstimpressions", "NJU-LAMDA [40] (paper)"),
                           ("table-ndcme", "LSN-TCN [4] (paper)")):  # fmt: skip
        text = _text(_outputs(notebook, tag))
        assert paper_row in text and reports.OURS in text and reports.MISSING in text
    assert "demo" in _text(_outputs(notebook, "runs"))
    outcomes = _outputs(notebook, "outcomes")
    assert _images(outcomes) == 1  # the confusion matrix
    assert "champion" in _text(outcomes) and "predicted" in _text(outcomes)


CHECKS = {
    "01_data_overview.ipynb": _check_data_overview,
    "02_reconstructions.ipynb": _check_reconstructions,
    "03_results_tables.ipynb": _check_results,
}
