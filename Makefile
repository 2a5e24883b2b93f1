# Two set-up commands (see README): `make demo` and `make test`. Each creates .venv if needed.
# TORCH picks the torch build to install; the default is the CPU wheel this repository tests with.
# On a GPU machine, install your CUDA/ROCm/XPU torch into .venv first (or set TORCH=) and it is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/neurox demo --out neurox-demo

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist load

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/backbone.py

clean:
	rm -rf $(VENV) neurox-demo .pytest_cache
