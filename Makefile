# CPU install path: torch is pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint train bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# torchattacks pins torchvision and an old requests it never imports: install it alone.
	$(BIN)/pip install --quiet --no-deps torchattacks==3.5.1
	$(BIN)/pip install --quiet -e ".[dev,plot]"
	touch $(STAMP)

test: install
	LIPCLI_DATA_DIR=$${LIPCLI_DATA_DIR:-$(abspath ../shared/data)} $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check lipcli tests bench

train: install
	LIPCLI_DATA_DIR=$${LIPCLI_DATA_DIR:-$(abspath ../shared/data)} $(BIN)/lipcli train

bench: install
	$(BIN)/python bench/constraints.py

clean:
	rm -rf $(VENV) build *.egg-info
