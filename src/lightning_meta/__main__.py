"""``python -m lightning_meta`` runs the command line."""

import sys

from lightning_meta._cli import main

sys.exit(main())
