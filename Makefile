# latent-patch: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests;
# `make bench-quick` runs every benchmark's --quick and says which targets are met (before every change lands).
# Each creates the virtual environment first (.venv, pip; torch resolves from the registry or local wheels).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.4" "torchvision>=0.19"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) -m latent_patch.demo

bench-quick: setup
	$(PY) benchmarks/quick.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
