# Kubeflow Trainer v2 LLM runtime images. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
REQS := requirements/dev.txt pkg/initializers/requirements.txt pkg/trainer/requirements.txt
PYTEST_ARGS ?=

.PHONY: help install test test-initializers test-trainer test-images test-images-full test-manifests \
        lint images push images-local bench demo clean

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with everything needed to run and test on a CPU machine

$(STAMP): $(REQS)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements/dev.txt
	touch $@

test: install ## run the whole test suite (installs first)
	$(MAKE) lint
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

test-initializers: install ## dataset and model initializer tests only
	$(PYTHON) -m pytest tests/initializers $(PYTEST_ARGS)

test-trainer: install ## llm-trainer tests only
	$(PYTHON) -m pytest tests/trainer $(PYTEST_ARGS)

lint: install ## ruff on the Python code
	$(VENV)/bin/ruff check pkg tests bench scripts
	$(VENV)/bin/ruff format --check pkg tests bench scripts

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
