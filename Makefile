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

LOCK := constraints.txt

.PHONY: setup test test-slow test-all lint bench demo clean lock gpu-check gpu-wheels browser

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet -c $(LOCK) --upgrade pip

# Every install goes through the lock ($(LOCK): the exact versions the tests passed with), so a
# fresh machine resolves nothing. torch first (pinned: these wheels ship with the machine), then
# the project and its test tools, built against that torch (--no-build-isolation keeps pip from
# fetching a second one); the editable install compiles model._C. Re-runs when the project
# files, the lock or csrc/ change.
$(STAMP): pyproject.toml setup.py $(LOCK) $(CSRC) | $(PY)
	$(PIP) install -c $(LOCK) torch==2.14.1 torchvision==0.29.1
	$(PIP) install -c $(LOCK) setuptools wheel ninja
	$(PIP) install -c $(LOCK) --no-build-isolation -e '.[dev]'
	# panopticapi-lite (test-only PQ reference) pins numpy<2, which pyarrow 26 cannot use;
	# its evaluation code runs fine on numpy 2, so it goes in without its pins.
	$(PIP) install --no-deps panopticapi-lite==0.2.0
	touch $@

lint: setup
	$(VENV)/bin/ruff check model pipeline jobs tests bench

# `make test` (what CI runs) leaves out the few multi-minute fault tests marked `slow` (a node
# and an actor lost, the fault campaign's trial, a killed and resumed fine-tune, two DDP workers,
# a real `ray start` for submit); `make test-slow` runs exactly those; `make test-all` both.
test: setup lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# One line per benchmark. torch-ms-deform-attn is the op's peer, installed for bench/op.py only.
# Longer ones, run by hand: bench/scale.py (cluster scale), bench/cold_start.py (100k files).
bench: setup
	$(PIP) install --quiet --no-build-isolation torch-ms-deform-attn==0.1.1
	$(PY) bench/op.py
	$(PY) bench/model_speed.py
	$(PY) bench/segment_job.py
	$(PY) bench/encode.py
	$(PY) bench/storage.py
	$(PY) bench/train.py

# Everything about the GPU path that needs a real GPU (see bench/gpu_check.py): run on a GPU
# machine with PyTorch preinstalled; without a GPU it says so and fails. gpu-wheels: the few
# packages such a machine may lack, as Python 3.12 wheels, made here (network) to carry along.
GPU_PY := $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check:
	$(GPU_PY) bench/gpu_check.py --report gpu-check-report.md

gpu-wheels:
	$(PIP) download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d gpu-wheels \
	  numpy safetensors pyyaml scipy pytest fsspec pillow

# Debian's Chromium, which the report's headless-browser test runs (tests/jobs/test_report.py
# fails without it, naming this target); installed once, as root (CI runs it before `make test`).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }

# The README's first command: the whole product on synthetic data (see jobs/demo.py).
demo: setup
	$(VENV)/bin/panoray demo --out demo-out

# Refresh the lock: resolve pyproject.toml afresh in a scratch venv and record what it got.
# Run after changing dependencies, then `make test` and commit constraints.txt.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 setuptools wheel ninja
	PANORAY_CUDA=0 .lock-venv/bin/pip install --quiet --no-build-isolation -e '.[dev]'
	.lock-venv/bin/pip install --quiet --no-deps panopticapi-lite==0.2.0
	{ echo "# Exact versions the test suite passed with; \`make setup\` installs through it (pip -c)."; \
	  echo "# Refresh: \`make lock\` (a scratch venv resolved from pyproject.toml, then pip freeze)."; \
	  .lock-venv/bin/pip freeze --all | grep -v '^-e\|^#\|^panoray'; } > $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf build *.egg-info model/_C*.so $(STAMP)
