# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo demo-samplers test lint browser serve bench clean

setup: $(VENV)/.installed

# torch is pinned first (a CPU build where pip finds one); the package's own `torch>=2.4` is then met.
# From the default index on Linux that pin is the CUDA build (gigabytes): give PyTorch's CPU wheel index
# as TORCH_INDEX to get the CPU build instead (make demo TORCH_INDEX=...).
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) || (echo "python3 -m venv failed: on Debian or Ubuntu, apt-get install python3-venv" && false)
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The main job: images from the shipped model, `shapes-32` (out/00000-0.png ... and a grid).
demo: setup
	$(BIN)/unnoise generate "a red circle above a blue square" -n 8 --seed 0 --out out

# Every sampler on an exact 2-D Gaussian mixture, drawn next to exact samples (out/demo.png).
demo-samplers: setup
	$(BIN)/unnoise demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Debian's chromium for the web page's browser tests (they skip, saying why, where it cannot be installed).
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the browser tests will be skipped"

test: lint browser
	$(BIN)/pytest

# The web page and the HTTP APIs on http://127.0.0.1:7860/ (see the README's "Serve" section).
serve: setup
	$(BIN)/unnoise serve

bench: setup
	$(BIN)/python benchmarks/samplers.py
	$(BIN)/python benchmarks/attention.py
	$(BIN)/pip install -q diffusers  # the peer measured against; not a dependency of unnoise
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/threads.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
