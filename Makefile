# The two quick-start commands. Each sets up what it needs first (scripts/bootstrap.sh: a virtual
# environment in $(VENV), torch $(TORCH), the editable build), idempotently.
#   make demo            train a tiny tokenizer + DiT on the CPU, sample, write PNGs + metrics to runs/demo
#   make test            the test suite (Triton kernels under TRITON_INTERPRET=1 on a CPU)
# Overrides: TORCH=2.11.0 make test (the oldest supported torch), VENV=..., PYTHON=python3.12, DEMO_OUT=...
VENV ?= .venv
TORCH ?= 2.14.1
PYTHON ?= python3
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?= -q -ra

export VENV TORCH PYTHON

.PHONY: bootstrap demo test
bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	@echo "[make demo] rectok-fast demo --out $(DEMO_OUT)"
	$(VENV)/bin/rectok-fast demo --out $(DEMO_OUT)

test: bootstrap
	@echo "[make test] python -m pytest tests $(PYTEST_ARGS)"
	$(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)
