# Two commands set up everything: `make demo` and `make test` (see README.md).
# Both create or reuse the virtual environment in .venv and install what they need.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup lint test demo bench clean

$(STAMP): setup.cfg pyproject.toml webapp/static/package.json
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,postgres]'
	cd webapp/static && npm ci --no-audit --no-fund --loglevel=error
	touch $(STAMP)

setup: $(STAMP)

# ruff: lint rules and formatting (pyproject.toml); `ruff format .` rewrites, this only checks
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	@mkdir -p test-output
	$(PY) -m pytest -ra --timeout=900 $(PYTEST_ARGS)

demo: setup
	$(PY) -m webapp.demo

clean:
	rm -rf test-output .pytest_cache
