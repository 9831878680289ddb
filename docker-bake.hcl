// The three runtime images of Kubeflow Trainer v2 for LLM fine-tuning.
//   docker buildx bake                                   # all three, local platform
//   REGISTRY=ghcr.io/me TAG=v2.0.1 docker buildx bake --push
//   make images-local                                    # same targets with buildah (reads this file)
// Keep this file plain (one attribute per line, string values, no functions): scripts/build_local_images.py
// parses it for the buildah path.

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
  targets = ["dataset-initializer", "model-initializer", "llm-trainer"]
}

// Shared by every image: build context, OCI labels, platforms.
target "_common" {
  context   = "."
  platforms = split(",", PLATFORMS)
  args = {
    VERSION  = "${TAG}"
    SOURCE   = "${SOURCE}"
    REVISION = "${REVISION}"
  }
  labels = {
    "org.opencontainers.image.source"   = "${SOURCE}"
    "org.opencontainers.image.version"  = "${TAG}"
    "org.opencontainers.image.revision" = "${REVISION}"
    "org.opencontainers.image.licenses" = "Apache-2.0"
    "org.opencontainers.image.vendor"   = "Kubeflow"
  }
}

target "dataset-initializer" {
  inherits   = ["_common"]
  dockerfile = "images/initializer/Dockerfile"
  target     = "dataset-initializer"
  args = {
    BASE_IMAGE = "python:3.11-slim-bookworm"
  }
  tags = ["${REGISTRY}/dataset-initializer:${TAG}", "${REGISTRY}/dataset-initializer:latest"]
}

target "model-initializer" {
  inherits   = ["_common"]
  dockerfile = "images/initializer/Dockerfile"
  target     = "model-initializer"
  args = {
    BASE_IMAGE = "python:3.11-slim-bookworm"
  }
  tags = ["${REGISTRY}/model-initializer:${TAG}", "${REGISTRY}/model-initializer:latest"]
}

// CUDA image with bitsandbytes for QLoRA. pytorch/pytorch publishes linux/amd64 only.
target "llm-trainer" {
  inherits   = ["_common"]
  dockerfile = "images/llm_trainer/Dockerfile"
  platforms  = ["linux/amd64"]
  args = {
    BASE_IMAGE         = "pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime"
    INSTALL_GPU_EXTRAS = "true"
  }
  tags = ["${REGISTRY}/llm-trainer:${TAG}", "${REGISTRY}/llm-trainer:latest"]
}
