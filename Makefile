# Two commands do everything on a fresh machine: `make run` and `make test` (each installs first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The main job on the embedded default. Until the fine-tuning job lands: embed synthetic images with an
# OpenPhenom-format model (random weights; pass ARGS="--checkpoint DIR" for the real one).
run: install
	$(BIN)/camae demo $(ARGS)

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python benchmarks/model_forward.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
