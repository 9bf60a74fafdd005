# Two commands do everything on a fresh machine: `make run` and `make test` (each installs first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	# the tests' oracle for EFAAR's TVN and recall, without the scvi-tools/geomloss stack it pulls in for other work
	$(BIN)/pip install -q --no-deps efaar-benchmarking==1.0
	touch $@

# The main job on the embedded default: synthetic plates (written on first run) -> frozen-encoder probes (raw,
# PCA-CenterScale, TVN) -> a Ray Tune sweep of LoRA and full fine-tuning -> the comparison table, all in a local
# MLflow store. ARGS="--set key=value ..." overrides the sweep config.
run: install
	$(BIN)/camae sweep --config configs/tune/quickstart.yaml $(ARGS)

# The model card's uses on synthetic images (random weights; ARGS="--checkpoint DIR" for the real ones).
demo: install
	$(BIN)/camae demo $(ARGS)

lint: install
	$(BIN)/ruff check .

# The browser test renders the MLflow UI in Debian's headless chromium (installed here when missing and possible)
test: lint
	@command -v chromium >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -q && apt-get install -y -q chromium) >/dev/null) || \
		echo "chromium not installed: the browser test will skip (apt-get install chromium)"
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python benchmarks/model_forward.py $(ARGS)

clean:
	rm -rf $(VENV) outputs data/synthetic mlruns mlartifacts .pytest_cache .ruff_cache
