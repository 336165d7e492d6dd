"""Estimate: parameters, FLOPs and training memory without allocating.

Read top to bottom: ``_estimate`` (``estimate`` and its result), ``_options``
(optimizers, precisions, input specs), ``_run`` (one training step under
FakeTensorMode), ``_track`` (live bytes and uncounted FLOPs), ``_repeat``
(exact extrapolation over identical blocks), ``_table`` (the rich table).
"""
