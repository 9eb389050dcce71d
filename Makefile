# The README's two commands: `make demo` and `make test`. Both create (or reuse) .venv and install
# the project from this repository's own files, so they work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffmem-installed

.PHONY: demo test lint install bench-zoo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffmem demo --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check diffmem tests benchmarks

bench-zoo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/zoo_memorization.py --zoo diffmem/zoo/checkpoint --out benchmarks/results/zoo_memorization.json
