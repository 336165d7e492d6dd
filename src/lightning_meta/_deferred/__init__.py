"""Deferred init: build on meta while recording, materialize bit-identical to eager.

Read top to bottom: ``_block`` (the ``deferred_init`` block: record, then swap
fake tensors for deferred meta tensors), ``_recorder`` (the dispatch mode that
logs every ATen call, phase by phase), ``_values`` (tensors to value ids),
``_rng`` (generator states: placeholders while recording, streams while
replaying), ``_record_errors`` (what cannot be recorded, and where it was
issued), ``_record`` (the op log), ``_handles`` (the one owner of what is
pending and what is done), ``_materialize`` (the public ``materialize``),
``_replay`` (re-running a slice of the log exactly), ``_load_hooks``
(``load_state_dict`` on deferred modules).
"""
