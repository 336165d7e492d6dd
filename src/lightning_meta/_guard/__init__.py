"""Guard: find meta tensors, and the Lightning callback that materializes at the right moment.

``_find`` (``find_meta_tensors``, ``assert_no_meta``; torch only),
``_materialize`` (materialization per strategy: whole, shard by shard, per
FSDP1 unit; torch only), ``_callback`` (``MetaGuard``; imports Lightning) and
``_check`` (the lifecycle walk behind ``lightning-meta check``).
"""
