# Two entry points that work on a fresh machine: `make train` and `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# torch is pinned in the same pip command as everything that depends on it, so pip takes the
# CPU wheel present on this machine instead of a multi-GB CUDA build. Override TORCH_SPEC on a GPU box.
TORCH_SPEC ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev,gguf,tasks,vl]"
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/sapo train $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check sapo tests bench

.PHONY: install train test lint
