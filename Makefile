# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo demo-samplers test lint bench clean

setup: $(VENV)/.installed

# torch is pinned first (a local CPU build); the package's own `torch>=2.4` is then already met.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The main job: images from the shipped model, `shapes-32` (out/*.png and out/sheet.png).
demo: setup
	$(BIN)/unnoise generate "a red circle above a blue square" -n 8 --seed 0 --out out

# Every sampler on an exact 2-D Gaussian mixture, drawn next to exact samples (out/demo.png).
demo-samplers: setup
	$(BIN)/unnoise demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/samplers.py
	$(BIN)/python benchmarks/attention.py
	$(BIN)/pip install -q diffusers  # the peer measured against; not a dependency of unnoise
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/startup.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
