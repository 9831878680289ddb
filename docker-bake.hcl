// The runtime images of Kubeflow Trainer v2 for LLM fine-tuning.
//   docker buildx bake                                   # all four, local platform
//   REGISTRY=ghcr.io/me TAG=v2.0.1 docker buildx bake --push
//   make images-local                                    # same targets with buildah (reads this file)
// scripts/build_local_images.py reads this file with an HCL parser and evaluates variables, interpolation,
// inherits, contexts and the usual bake functions (scripts/bakefile.py lists them) for the buildah path.

variable "REGISTRY" {
  default = "ghcr.io/kubeflow/trainer"
}

variable "TAG" {
  default = "v2.0.0"
}

// Comma-separated; the release pipeline sets PLATFORMS=linux/amd64,linux/arm64 with --push.
variable "PLATFORMS" {
  default = "linux/amd64"
}

variable "SOURCE" {
  default = "https://github.com/kubeflow/trainer"
}

// The commit the images are built from (`make images` and `make push` pass `git rev-parse --short HEAD`).
variable "REVISION" {
  default = "unknown"
}

group "default" {
  targets = ["dataset-initializer", "model-initializer", "llm-trainer", "model-exporter"]
}

// Build context and platforms of every target.
target "_common" {
  context   = "."
  platforms = split(",", PLATFORMS)
}

// The OCI labels of every image. Each Dockerfile also sets them from the build args in `_image`, so a
// plain `docker build` labels its image too.
target "_labels" {
  inherits = ["_common"]
  labels = {
    "org.opencontainers.image.source"   = "${SOURCE}"
    "org.opencontainers.image.version"  = "${TAG}"
    "org.opencontainers.image.revision" = "${REVISION}"
    "org.opencontainers.image.licenses" = "Apache-2.0"
    "org.opencontainers.image.vendor"   = "Kubeflow"
  }
}

target "_image" {
  inherits = ["_labels"]
  args = {
    VERSION  = "${TAG}"
    SOURCE   = "${SOURCE}"
    REVISION = "${REVISION}"
  }
}

// What both initializers and the exporter share (Python, the pinned venv, the user, the labels). Never
// pushed on its own: each names it as its build context `base`, so bake builds it once for all three.
target "initializer-base" {
  inherits   = ["_image"]
  dockerfile = "images/initializer_base/Dockerfile"
  args = {
    BASE_IMAGE = "python:3.11-slim-bookworm"
  }
  output = ["type=cacheonly"]
}

// The two initializers add their package, title and command to initializer-base.
target "dataset-initializer" {
  inherits   = ["_labels"]
  dockerfile = "images/dataset_initializer/Dockerfile"
  contexts = {
    base = "target:initializer-base"
  }
  tags = ["${REGISTRY}/dataset-initializer:${TAG}", "${REGISTRY}/dataset-initializer:latest"]
}

target "model-initializer" {
  inherits   = ["_labels"]
  dockerfile = "images/model_initializer/Dockerfile"
  contexts = {
    base = "target:initializer-base"
  }
  tags = ["${REGISTRY}/model-initializer:${TAG}", "${REGISTRY}/model-initializer:latest"]
}

// CUDA image: torch==<requirements/torch.txt> from PyPI (a CUDA build, with its nvidia-* libraries) and
// bitsandbytes for QLoRA, on the same Python base as the initializers. amd64 only for now.
target "llm-trainer" {
  inherits   = ["_image"]
  dockerfile = "images/llm_trainer/Dockerfile"
  platforms  = ["linux/amd64"]
  args = {
    BASE_IMAGE         = "python:3.11-slim-bookworm"
    INSTALL_GPU_EXTRAS = "true"
  }
  tags = ["${REGISTRY}/llm-trainer:${TAG}", "${REGISTRY}/llm-trainer:latest"]
}

// The trainer's output to S3, the Hub or a volume (+ Model Registry): pkg/initializers and
// pkg/model_exporter, huggingface_hub and the model-registry client on initializer-base.
target "model-exporter" {
  inherits   = ["_labels"]
  dockerfile = "images/model_exporter/Dockerfile"
  contexts = {
    base = "target:initializer-base"
  }
  tags = ["${REGISTRY}/model-exporter:${TAG}", "${REGISTRY}/model-exporter:latest"]
}
