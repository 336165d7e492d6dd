"""Estimate: parameters, FLOPs and training memory without allocating, for one process or one rank.

Read top to bottom: ``_estimate`` (``estimate``: options, build, inputs,
simulate, assemble), ``_options`` (precisions and option checking),
``_parallel`` (strategy options: DDP, FSDP2, tensor parallel), ``_layout``
(one rank's share of the model: blocks, tensor-parallel shapes, shards),
``_optimizer`` (optimizer factories and their warm-up), ``_specs``
(``InputSpec`` and input parsing), ``_fake`` (fake and meta state),
``_values`` (values known from the inputs alone), ``_run`` (one training
step under FakeTensorMode), ``_ranks`` (one rank's step: the strategy's
buffers and collectives), ``_fsdp2`` (FSDP2's buffers, unit by unit), ``_track`` (live bytes and uncounted FLOPs),
``_repeat`` (exact extrapolation over identical blocks), ``_result``
(``Estimate``, ``ModuleEstimate``, ``RankEstimate``), ``_fit`` (what fits in
a memory budget), ``_table`` (the rich tables).
"""
