# panoray developer commands. `make demo` and `make test` bootstrap everything they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CUDA kernels are compiled (not run) wherever a toolkit is installed, so they cannot rot.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
STAMP := $(VENV)/.panoray-setup
PYTEST_ARGS ?=

.PHONY: setup test lint bench demo clean

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first (pinned: these wheels ship with the machine), then the project and its test tools,
# built against that torch (--no-build-isolation keeps pip from fetching a second one); the
# editable install compiles model._C. Re-runs when the project files or csrc/ change.
$(STAMP): pyproject.toml setup.py $(CSRC) | $(PY)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install setuptools wheel ninja
	$(PIP) install --no-build-isolation -e '.[dev]'
	# panopticapi-lite (test-only PQ reference) pins numpy<2, which pyarrow 26 cannot use;
	# its evaluation code runs fine on numpy 2, so it goes in without its pins.
	$(PIP) install --no-deps panopticapi-lite==0.2.0
	touch $@

lint: setup
	$(VENV)/bin/ruff check model pipeline jobs tests bench

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# One line per benchmark. torch-ms-deform-attn is the op's peer, installed for bench/op.py only.
bench: setup
	$(PIP) install --quiet --no-build-isolation torch-ms-deform-attn==0.1.1
	$(PY) bench/op.py
	$(PY) bench/model.py
	$(PY) bench/pipeline.py
	$(PY) bench/train.py

# The README's first command: the whole product on synthetic data (see jobs/demo.py).
demo: setup
	$(VENV)/bin/panoray demo --out demo-out

clean:
	rm -rf build *.egg-info model/_C*.so $(STAMP)
