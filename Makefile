# Kubeflow Trainer v2 LLM runtime images. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
REQS := requirements/dev.txt requirements/torch.txt requirements/torchtune.txt pkg/initializers/requirements.txt pkg/trainer/requirements.txt \
        pkg/trainer/requirements-gpu.txt pkg/model_exporter/requirements.txt \
        pkg/trainer/requirements-trackers.txt
PYTEST_ARGS ?=

.PHONY: help install test test-fast test-initializers test-trainer test-exporter test-images test-images-full test-images-cuda test-manifests \
        lint images push images-local bench demo clean

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with everything needed to run and test on a CPU machine

$(STAMP): $(REQS)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements/dev.txt
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps -r requirements/torchtune.txt
	touch $@

test: install ## run the whole test suite (installs first)
	$(MAKE) lint
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

test-fast: install ## the fast tier: in-process unit tests marked `fast` (under a minute); run it on every edit
	$(PYTHON) -m pytest tests -m fast -q $(PYTEST_ARGS)

test-initializers: install ## dataset and model initializer tests only
	$(PYTHON) -m pytest tests/initializers $(PYTEST_ARGS)

test-trainer: install ## llm-trainer tests only
	$(PYTHON) -m pytest tests/trainer $(PYTEST_ARGS)

test-exporter: install ## model exporter tests only (S3 on moto and rclone, Hub, Model Registry contract server)
	$(PYTHON) -m pytest tests/model_exporter $(PYTEST_ARGS)

lint: install ## ruff on the Python code, hadolint on the Dockerfiles, actionlint on the workflows
	$(VENV)/bin/ruff check pkg tests bench scripts demo
	$(VENV)/bin/ruff format --check pkg tests bench scripts demo
	$(VENV)/bin/hadolint images/*/Dockerfile
	$(VENV)/bin/actionlint .github/workflows/*.yml

# --- images (docker-bake.hcl is the one source of targets, args and tags) ---------------------------------
BAKE_ARGS ?=
IMAGES ?=

images: ## build the four images with `docker buildx bake` (Docker engine + buildx; REGISTRY, TAG, PLATFORMS)
	REVISION=$${REVISION:-$$(git rev-parse --short HEAD)} docker buildx bake --file docker-bake.hcl $(BAKE_ARGS)

push: ## build and push by hand (a release is a v* tag: .github/workflows/release.yml): PLATFORMS=... TAG=... make push
	REVISION=$${REVISION:-$$(git rev-parse --short HEAD)} docker buildx bake --file docker-bake.hcl --push $(BAKE_ARGS)

images-local: install ## the same targets with buildah, no Docker engine (root; IMAGES="dataset-initializer ...")
	$(PYTHON) scripts/build_local_images.py $(IMAGES)

test-images: install ## build the initializer and exporter images and run them against local S3 and Hub servers (root)
	$(PYTHON) -m pytest tests/images $(PYTEST_ARGS)

test-images-full: install ## test-images + a CPU llm-trainer image running a 2-process LoRA fine-tune
	$(PYTHON) -m pytest tests/images/test_*.py tests/images/full_trainer_image.py $(PYTEST_ARGS)  # a folder argument would swallow the extra file

test-images-cuda: install ## build the CUDA llm-trainer exactly as released and check it on this CPU (root; ~20 min, 6 GB)
	$(PYTHON) -m pytest -s tests/images/cuda_trainer_image.py $(PYTEST_ARGS)  # not test_*: make test leaves it out

test-manifests: install ## runtime manifests and example TrainJobs
	$(PYTHON) -m pytest tests/manifests $(PYTEST_ARGS)

BENCH_ARGS ?=
bench: install ## run every benchmark in bench/ side by side with the usual tools; writes docs/benchmarks.md
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements/bench.txt
	$(PYTHON) bench/run_all.py $(BENCH_ARGS)

MODEL ?=
DATASET ?=
demo: install ## run the whole pipeline on the embedded tiny model + dataset (or MODEL=hf://... DATASET=hf://...)
	$(PYTHON) -m demo --model "$(MODEL)" --dataset "$(DATASET)"

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
