"""Dataset initializer: `python -m pkg.initializers.dataset` fills OUTPUT_PATH (/workspace/dataset)."""
