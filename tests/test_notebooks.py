"""The committed notebooks: valid, stripped, one parameters cell, the house anatomy."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from colqwen3_lib.course import NOTEBOOKS

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_the_course_notebooks_are_all_there():
    assert [p.stem for p in PATHS] == list(NOTEBOOKS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_is_valid_stripped_and_has_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_follows_the_course_anatomy(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0].source
    assert first.startswith("# ") and "Run time" in first
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for line in params.source.splitlines():
        name, rest = line.split(":", 1)
        assert name.isupper() and "=" in rest and "#" in rest, f"flat, typed, commented parameter: {line!r}"
    assert "OUTPUT_DIR" in params.source
    # The last section: two or three exercises, each answered by a cell the learner runs; before it, the cell
    # that writes metrics.json for the course runner.
    try_this = max(i for i, c in enumerate(nb.cells) if c.source.startswith("## ") and "Try this" in c.source)
    exercises = re.findall(r"^\d\. ", nb.cells[try_this].source, flags=re.MULTILINE)
    assert 2 <= len(exercises) <= 3 and all(c.cell_type == "code" for c in nb.cells[try_this + 1 :])
    assert "metrics.json" in nb.cells[try_this - 1].source
    sections = [
        c.source.split("\n", 1)[0]
        for c in nb.cells
        if c.cell_type == "markdown" and c.source.startswith("## ")
    ]
    assert [s.split(".")[0] for s in sections] == [f"## {i}" for i in range(1, len(sections) + 1)]
    assert not any("sys.path" in c.source or "!pip" in c.source for c in nb.cells)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path):
    import papermill

    nb = nbformat.read(path, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [line.split(":", 1)[0] for line in params.source.splitlines()]
    assert list(papermill.inspect_notebook(str(path))) == names


def test_notebook_json_is_stable_on_disk():
    for path in PATHS:
        assert json.loads(path.read_text())["nbformat"] == 4
