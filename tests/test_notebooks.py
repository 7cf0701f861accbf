"""Every notebook runs top to bottom on the zoo models and shows at least one picture inline."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_stored_without_outputs():
    assert [n.stem for n in NOTEBOOKS] == ["grounding", "hallucination", "pruning", "sinks"]
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c.cell_type == "code"), path.name


@pytest.mark.slow  # 13-28 s each on an idle 2-core machine, more when the zoo folders are first assembled
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_pictures(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    # generous limits: on a loaded machine the kernel alone can take minutes to start
    NotebookClient(notebook, kernel_name="python3", timeout=3000, startup_timeout=600,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no picture"
