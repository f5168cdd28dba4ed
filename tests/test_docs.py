"""The code a reader copies from the README and docs/ runs as written, offline: the snippets that say so."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def _block(path: str, marker: str) -> str:
    """The one python block of `path` that contains `marker`."""
    found = [block for block in _python_blocks(ROOT / path) if marker in block]
    assert len(found) == 1, f"{path}: {len(found)} python blocks contain {marker!r}"
    return found[0]


OFFLINE_SNIPPETS = {  # (file, a line that picks its block): what the block leaves behind to check
    (
        "README.md",
        'load_model("tiny")',
    ): "assert len(hits[0]) == 5 and Path('hits.png').stat().st_size > 10_000",
    ("docs/checkpoints.md", 'ColQwen3.from_pretrained("tiny")'): "assert tuple(scores.shape) == (1, 2)",
    ("docs/memory.md", "suggest_settings(24, setup)"): "assert estimate_memory(setup).total_gib > 0",
}


@pytest.mark.slow
@pytest.mark.parametrize("where", OFFLINE_SNIPPETS, ids=lambda where: where[0])
def test_an_offline_snippet_runs_as_written(where, tmp_path):
    code = "from pathlib import Path\n" + _block(*where) + "\n" + OFFLINE_SNIPPETS[where] + "\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
