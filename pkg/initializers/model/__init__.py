"""Model initializer: `python -m pkg.initializers.model` fills OUTPUT_PATH (default /workspace/model)."""
