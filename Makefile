# The two commands (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create the virtual environment from the lock file first; nothing else is needed but python3.11.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
UV_VERSION := 0.13.9
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
STAMP := $(VENV)/.installed

# Offline and telemetry switches shared by every target.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export HF_HUB_OFFLINE := 1
# Let Python cache bytecode: every stage and test process imports torch, MLflow, Prefect...;
# without .pyc files each one compiles them again (seconds per process). The first process
# that imports a module writes its .pyc; compiling the whole environment at install time
# (uv's --compile-bytecode) took 35 s for 25,000 files of which `make demo` imports 6,600.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test test-all lint bench lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --python $(BIN)/python --require-hashes requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	dvc repro

test: lint
	$(BIN)/python -m pytest

test-all: lint
	$(BIN)/python -m pytest -m ''

lint: $(STAMP)
	$(BIN)/ruff check socialmae tests benchmarks flows notebooks
	$(BIN)/ruff format --check socialmae tests benchmarks flows notebooks

bench: $(STAMP)
	$(BIN)/python benchmarks/pretrain_step.py
	$(BIN)/python benchmarks/train_loop.py

# Re-resolve the lock file after editing pyproject.toml (needs the package registry).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --no-emit-package opencv-python \
		-o requirements.lock

clean:
	rm -rf $(VENV)
