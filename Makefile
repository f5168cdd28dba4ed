# Quick start: `make course` (runs the offline course) and `make test` (runs the test suite);
# both create .venv with the kit installed the first time they run.
# `make lab` opens the course in JupyterLab; `make demo` is a one-minute end-to-end check; `make bench` prints
# the benchmarks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= notebooks,eval,dev,mteb
# One test worker per core (pytest-xdist; PYTEST_WORKERS= runs in one process); each test file stays on one
# worker, with its module fixtures. PYTEST_ARGS passes anything else to pytest.
PYTEST_WORKERS ?= -n auto --dist loadfile
PYTEST_ARGS ?=
# Anything else for JupyterLab, e.g. LAB_ARGS="--no-browser --port=8899". As root (containers, cloud notebooks)
# `make lab` adds --allow-root, without which JupyterLab refuses to start.
LAB_ARGS ?=

.PHONY: install course lab demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

course: install
	$(BIN)/python -m colqwen3_lib.course --profile tiny --output-dir runs/tiny --no-progress

lab: install
	cd notebooks && $(strip ../$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS))

demo: install
	$(BIN)/python -m colqwen3_lib.demo

test: install
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check colqwen3_lib tests benchmarks notebooks
	$(BIN)/ruff format --check colqwen3_lib tests benchmarks notebooks

bench: install
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_grad_cache.py
	$(BIN)/python benchmarks/bench_memory.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
