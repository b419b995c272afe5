# Two commands do all set-up on a fresh machine (see README):
#   make book   -> virtual environment + CPU torch + companion[book], builds the book, prints where the HTML is
#   make test   -> the same environment, ruff (make lint), unit tests + every chapter executed under nbval
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments for torch, e.g. a CPU-only index on machines without a local CPU wheel.
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

# The real BBBC010 copy beside the project (as in CI) is used when present; otherwise the
# loader falls back to $BBBC010_ROOT or its download cache.
SHARED_BBBC010 := $(abspath ../shared/bbbc010)
ifeq ($(BBBC010_ROOT),)
ifneq ($(wildcard $(SHARED_BBBC010)/masks_eachworm),)
export BBBC010_ROOT := $(SHARED_BBBC010)
endif
endif
export PYTHONHASHSEED := 0

.PHONY: env book test unit notebooks lint format clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch first, so the loose `torch>=2.1` of the package pulls nothing bigger.
	$(BIN)/python -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[book,test]"
	rm -f $(VENV)/.installed-* && touch $@

book: env
	rm -rf _build/html
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "The book is at: file://$(abspath _build/html/index.html)"

unit: env
	$(BIN)/python -m pytest -q tests --doctest-modules companion

notebooks: env
	$(BIN)/python -m pytest --nbval-lax -q --nbval-cell-timeout=900 book

test: lint unit notebooks

# ruff (configured in pyproject.toml): lint and formatting, package, tests, scripts and chapters
lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: env
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf _build .pytest_cache
