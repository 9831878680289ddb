"""Download a dataset: `STORAGE_URI=hf://ORG/NAME python -m pkg.initializers.dataset`."""

import sys

from pkg.initializers.main import main

sys.exit(main("dataset"))
