# Everyday commands. `make demo` and `make test` are the two a newcomer needs (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to a CPU build: where no local wheelhouse and no GPU exist, take it from PyTorch's CPU index
# rather than the multi-GB CUDA build PyPI serves for Linux.
TORCH_INDEX ?= $(shell [ -d /opt/wheels ] || command -v nvidia-smi >/dev/null 2>&1 || echo --extra-index-url https://download.pytorch.org/whl/cpu)
PORT ?= 8001
REPO ?= model_repository

.PHONY: browser setup setup-serving demo serve test test-fast lint proto train-default bench gpu-check containers clean

$(VENV)/.serving: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[server]"
	touch $@

$(VENV)/.full: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) -e ".[dev]"
	touch $(VENV)/.serving $@

setup-serving: $(VENV)/.serving   ## the server and the client (no torch): what `make demo` needs
setup: $(VENV)/.full browser      ## everything: server, training, reports, tests, lint

# The page's browser test drives the system's Chromium (Playwright, no download of its own). Installed with
# apt-get where that can run (root); elsewhere the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
	      || echo "chromium could not be installed: the page's browser test will be skipped"; \
	  else echo "no chromium and no apt-get as root: the page's browser test will be skipped"; fi

demo: setup-serving               ## serve the bundled model, classify and explain sample images, stop
	@bash scripts/demo.sh $(PY) $(PORT)

serve: setup-serving              ## serve the bundled repository in the foreground
	$(PY) -m serving serve --model-repository $(REPO) --port $(PORT)

test: setup                       ## lint, import contracts, then the whole test suite
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

test-fast: setup                  ## the fast tier: unit tests and the in-process server's API tests, under 60 s
	$(PY) -m pytest -q -m "not slow"

lint: setup                       ## ruff and the import contracts (.importlinter)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

proto: setup                      ## regenerate serving/wire from proto/
	$(PY) proto/generate.py

train-default: setup              ## reproduce the bundled model (about 60 minutes on 2 shared CPU cores, see docs/training.md)
	$(PY) -m training train --config configs/small_fmnist.yaml
	$(PY) -m training export runs/small_fmnist/checkpoint.pt --model-repository $(REPO) --name fashion_mnist

bench: setup                      ## the serving benchmark table (CPU here, GPU where present)
	$(PY) bench/serving_bench.py

gpu-check: setup                  ## the short GPU check (see bench/gpu_check.sh)
	PYTHON=$(PY) bash bench/gpu_check.sh run

# Not part of `make test`: see docs/deploy.md (it needs root and several minutes of its own).
containers: setup                 ## build the images with podman and run them: serving container, compose topology
	PYTHON=$(PY) bash scripts/containers/run.sh

clean:
	rm -rf $(VENV) runs cam_overlays .pytest_cache .ruff_cache
