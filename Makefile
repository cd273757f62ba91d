# `make demo` and `make test` work on a fresh clone: each creates .venv (unless a virtualenv is
# active) and installs the project into it first.
PYTHON ?= python3.11
TORCH ?= torch==2.14.1 torchvision==0.29.1
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.kosmos-installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/kosmos model summary --config configs/model/tiny.yaml

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: install
	$(BIN)/ruff check kosmos tests data launch

clean:
	rm -rf runs sample .pytest_cache
