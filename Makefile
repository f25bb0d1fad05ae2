# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
# Every install goes through constraints.txt: the exact versions CI tests (pyproject.toml has the ranges).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test test-slow test-install lint install clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: on these machines the CPU build lies on disk; a resolver left to pick torch
	# together with the rest could fetch a multi-GB CUDA build instead.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tessera demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The install proofs alone (a fresh venv with a preinstalled torch, Python 3.10/3.12 checks): docs/training.md
test-install: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_install.py

lint: $(STAMP)
	$(BIN)/ruff check tessera tests

clean:
	rm -rf $(VENV) demo_out
