# make demo   creates .venv, installs, then distils a teacher into a student on the CPU
# make test   creates .venv, installs the package with its test extras, runs the tests
# make lint   ruff lint and format check
# make bench  runs every benchmark's quick mode on the device present (bench/results/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch used as the reference in parity tests. Override TORCH
# to use another build (e.g. TORCH="torch==2.11.0").
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

DEMO_DIR ?= /tmp/llama_jax_demo

.PHONY: demo test lint format install bench

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,hf,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo --workdir=$(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist load tests

bench: $(STAMP)
	$(PY) -m bench.train --quick
	$(PY) -m bench.generate --quick
	$(PY) -m bench.distill --quick
	$(PY) -m bench.quant --quick
	$(PY) -m bench.convert --quick
	$(PY) -m bench.prune --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
