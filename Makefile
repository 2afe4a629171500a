# Two entry points: `make demo` (set-up + the main job) and `make test` (set-up + the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; a plain `pip install torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: with spinning, torch on a CPU shared with any other busy process
# runs up to 20x slower (measured: 5.7 s vs 0.32 s per demo training step).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test bench lint install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test]"
	# timm, the tests' oracle for backbone resampling, pulls torchvision, whose wheels ask for a newer torch (a
	# multi-GB CUDA build): both go, without dependencies, into a folder only the tests import (tests/oracles.py).
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/oracles "timm==1.0.31" "torchvision==0.29.1"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m modeling_eomt.training.demo

# Tiny models gain nothing from a second thread, and on a shared machine OpenMP spin-waits make 2 threads far slower.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run.py

lint: install
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) demo_output
