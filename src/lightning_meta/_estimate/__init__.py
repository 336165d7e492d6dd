"""Estimate: parameters, FLOPs and training memory without allocating.

Read top to bottom: ``_estimate`` (``estimate``: options, build, inputs,
simulate, assemble), ``_options`` (precisions and option checking),
``_optimizer`` (optimizer factories and their warm-up), ``_specs``
(``InputSpec`` and input parsing), ``_fake`` (fake and meta state),
``_run`` (one training step under FakeTensorMode), ``_track`` (live bytes and
uncounted FLOPs), ``_repeat`` (exact extrapolation over identical blocks),
``_result`` (``Estimate``, ``ModuleEstimate``), ``_table`` (the rich table).
"""
