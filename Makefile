# make demo   creates .venv, installs, then distils a teacher into a student on the CPU
# make test   creates .venv, installs the package with its test extras, runs the tests
# make lint   ruff lint and format check
# make bench  runs every benchmark's quick mode on the device present (bench/results/)
# make gpu-wheels  downloads into .whl/ the wheels a preinstalled CUDA JAX machine lacks
# make bench-gpu   on such a machine (no .venv, no network): GPU tests and the 1b benchmarks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch used as the reference in parity tests. Override TORCH
# to use another build (e.g. TORCH="torch==2.11.0").
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

DEMO_DIR ?= /tmp/llama_jax_demo

.PHONY: demo test lint format install bench bench-gpu gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,hf,demo]"
	@# The TPU compiler that matches the installed JAX (its `tpu` extra pins libtpu): the
	@# tests compile steps ahead of time for TPU topologies with it, on this CPU. Where it
	@# cannot be installed, those tests are skipped with the reason.
	$(PY) -m pip install -q "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')" \
	  || echo "warning: libtpu could not be installed; TPU compile tests will be skipped"
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
	$(PY) -m bench.on_policy --quick
	$(PY) -m bench.structured_prune --quick
	$(PY) -m bench.teacher_logits --quick
	$(PY) -m bench.data --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Python 3.12 x86-64 wheels of the project's imports that a machine with CUDA JAX, flax,
# optax, orbax, torch and transformers preinstalled does not have. Pure-Python wheels;
# their own requirements (absl-py, PyYAML, numpy, packaging, protobuf) are preinstalled.
GPU_WHEELS ?= ml_collections==1.1.0 tensorboardX==2.6.5
WHEEL_DIR ?= .whl
GPU_PYTHON ?= python3
BENCH_GPU_FLAGS ?=

gpu-wheels:
	mkdir -p $(WHEEL_DIR)
	rm -f $(WHEEL_DIR)/*.whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d $(WHEEL_DIR) $(GPU_WHEELS)
	du -sh $(WHEEL_DIR)

# Installs $(WHEEL_DIR)/*.whl into a temporary directory, then runs the GPU tests and the
# train, quant, distill and generate benchmarks at the llama3.2-1b shape in at most
# 8 minutes; BENCH_OUT=DIR also gets the results, charts and the log.
bench-gpu:
	$(GPU_PYTHON) -m bench.run_gpu --wheels=$(WHEEL_DIR) $(BENCH_GPU_FLAGS)
