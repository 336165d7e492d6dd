"""``python -m lightning_meta`` runs the command line."""

import sys

from lightning_meta._cli._main import main

sys.exit(main())
