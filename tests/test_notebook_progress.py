"""Progress bars in Jupyter are widgets, as a notebook user meets them.

The package draws its bars with ``tqdm.auto``: in a Jupyter kernel with ipywidgets
installed that is a widget bar (a ``display_data`` output), elsewhere a text bar on stderr.
Without ipywidgets tqdm falls back to text and warns "IProgress not found"; the notebooks
used to hide that warning. These tests run a real kernel, so they fail if the dependency is
dropped, and read the committed notebooks, so they fail if the filter comes back or their
outputs were made without widgets.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"


def _outputs(notebook) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def test_a_kernel_draws_the_packages_progress_bars_as_widgets():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from intattn_analysis.known import tqdm\n"
        "for _ in tqdm(range(3), desc='facts'):\n"
        "    pass")])
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = _outputs(notebook)
    assert any(WIDGET in output.get("data", {}) for output in outputs), outputs
    stderr = "".join(output.get("text", "") for output in outputs if output.get("name") == "stderr")
    assert "IProgress not found" not in stderr and "facts:" not in stderr, stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_neither_hide_the_widget_warning_nor_keep_text_bars(path):
    notebook = nbformat.read(path, as_version=4)
    sources = "\n".join(cell.source for cell in notebook.cells)
    assert "IProgress" not in sources, f"{path.name} filters the warning that says widget bars are missing"
    stderr = "".join(output.get("text", "") for output in _outputs(notebook) if output.get("name") == "stderr")
    assert "IProgress not found" not in stderr, f"{path.name}'s committed outputs were made without ipywidgets"
    text_bars = [line for line in stderr.replace("\r", "\n").splitlines() if "it/s]" in line or "s/it]" in line]
    assert not text_bars, f"{path.name}'s committed bars are text, not widgets: {json.dumps(text_bars[:2])}"
