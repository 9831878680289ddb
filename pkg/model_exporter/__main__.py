"""Export the trained model: `STORAGE_URI=s3://BUCKET/PREFIX python -m pkg.model_exporter`."""

import sys

from pkg.model_exporter.main import main

sys.exit(main())
