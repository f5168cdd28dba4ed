"""The two ways in stay in sync: pyproject extras, environment.yml, Makefile, CI and README."""

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_project_with_its_extras():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert any(str(d).startswith("python=3.1") for d in env["dependencies"])
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    match = re.fullmatch(r"-e \.\[(.+)\]", pip[0])
    assert match, "environment.yml must install the project itself: `-e .[extras]`"
    extras = set(match.group(1).split(","))
    declared = set(_pyproject()["project"]["optional-dependencies"])
    # every extra but `gpu` (flash-attn compiles against CUDA), which GPU users add by hand
    assert extras == declared - {"gpu"}


def test_makefile_installs_the_same_extras_as_environment_yml():
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r"^EXTRAS \?= (.+)$", makefile, re.M).group(1)
    env_pip = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"][-1]["pip"][0]
    assert f"[{extras}]" in env_pip


def test_dependency_ranges_admit_the_supported_versions():
    deps = " ".join(_pyproject()["project"]["dependencies"])
    assert "transformers>=4.57" in deps
    assert "torch>=2.4" in deps and "torchvision" in deps
    assert _pyproject()["project"]["requires-python"] == ">=3.10"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[: readme.index("\n## ", readme.index("## Quick start") + 1)]
    assert "make course" in quick_start and "make test" in quick_start
