"""Download a model: `STORAGE_URI=hf://ORG/NAME python -m pkg.initializers.model` (docs/initializers.md)."""

import sys

from pkg.initializers.main import main

sys.exit(main("model"))
