"""Shared pytest set-up: ``tests/`` is on ``sys.path`` (pytest's ``pythonpath``), so every
test imports its models from :mod:`support`; nothing here changes global state."""
