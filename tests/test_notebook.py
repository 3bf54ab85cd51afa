"""examples/quickstart.ipynb executes top to bottom on tiny settings, and is committed clean."""

import pathlib

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} has committed outputs"
            assert cell.execution_count is None, f"cell {index} has an execution count"
    install = notebook.cells[1].source
    assert "pip install" in install and all(
        line.startswith("#") for line in install.splitlines() if line.strip()
    ), "the install cell must stay commented out"


def test_notebook_executes_on_tiny_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FAMO_NOTEBOOK_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: PNGs
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "20 steps per run" in text
    assert "| value  | abs error |" in text
    assert "updates applied: 20 skipped: 0" in text
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 2  # the loss curves and FAMO's task weights
    assert not [out for out in outputs if out.output_type == "error"]
