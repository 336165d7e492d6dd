"""Shared test models, multi-process runners and measurements (not part of the package)."""

from pathlib import Path

#: This folder: test models are also ``lightning-meta`` CLI targets by file path.
SUPPORT = Path(__file__).resolve().parent
