"""The book's notebooks: same skeleton everywhere, outputs stripped, and each runs in smoke mode."""
import json
import shutil
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
NOTEBOOKS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))
SHARED_PARAMETERS = ("smoke", "data_dir", "run_dir", "preset", "seed", "device")


def _cells(path):
    return json.loads(path.read_text())["cells"]


def test_there_are_chapters():
    names = [p.stem for p in NOTEBOOKS]
    assert names[0] == "00_introduction" and len(names) >= 8, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} carries outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_skeleton(path):
    cells = _cells(path)
    title = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and title.startswith("# "), "first cell: a title"
    assert "You will learn" in title and "colab.research.google.com/github/" in title, "learn + Colab badge"
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one papermill `parameters` cell"
    src = "".join(params[0]["source"])
    for name in SHARED_PARAMETERS:
        assert f"\n{name} = " in "\n" + src, f"parameters cell lacks `{name}`"
    setup = cells[cells.index(params[0]) + 1]
    setup_src = "".join(setup["source"])
    assert "google.colab" in setup_src and "setup(" in setup_src, "setup cell (Colab install, setup()) follows"
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "## Recap" in text and "## Exercises" in text
    for cell in cells:  # thin notebooks: the library computes
        if cell["cell_type"] == "code":
            logic = [l for l in "".join(cell["source"]).splitlines() if l.strip() and not l.strip().startswith("#")]
            assert len(logic) <= 25, f"{path.name}: a code cell with {len(logic)} lines belongs in tbkd_lib"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_in_smoke_mode(path, tmp_path_factory, smoke_run_dir):
    """Every chapter executes top to bottom under papermill with smoke=True (shared smoke run dir)."""
    papermill = pytest.importorskip("papermill")
    out = tmp_path_factory.mktemp("nb") / path.name
    papermill.execute_notebook(str(path), str(out), parameters={"smoke": True, "run_dir": str(smoke_run_dir)},
                               cwd=str(BOOK), kernel_name="python3", progress_bar=False)


@pytest.fixture(scope="session")
def smoke_run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke") / "run"
