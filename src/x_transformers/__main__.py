"""``python -m x_transformers ...`` runs the ``xtransformers`` command."""

import sys

from .cli import main

sys.exit(main())
