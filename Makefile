# Two entry points, both starting from a fresh clone:
#   make run   - create .venv with pinned dependencies, then run the pipeline (dvc repro)
#   make test  - the same set-up, then the whole test suite
# and for development: make test-fast (unit tests only: no end-to-end or model-training tests),
# make lint (ruff, ruff format --check, mypy, import-linter's layer contracts)
# and the scheduled job's: make retrain (dvc pull, dvc repro, promotion gate, dvc push; RETRAIN_ARGS
# passes options such as --remote NAME or --no-remote to `tlpipe retrain`)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# stage commands call `python`: make it the one in .venv, whatever the caller's PATH holds
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test test-fast lint retrain app clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,lint]'
	$(BIN)/python -m pip check
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest -n logical --dist loadfile --durations=30 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n logical --dist loadfile -m "not e2e and not slow" $(PYTEST_ARGS)

LINTED := src stages tests benchmarks
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/lint-imports

retrain: $(STAMP)
	$(BIN)/tlpipe retrain $(RETRAIN_ARGS)

# the upload page on http://127.0.0.1:8501/ for models/model.keras (APP_ARGS: --model URI, --port N, ...)
app: $(STAMP)
	$(BIN)/tlpipe app $(APP_ARGS)

clean:
	rm -rf data/raw data/split data/augmented models results mlruns mlflow.db
