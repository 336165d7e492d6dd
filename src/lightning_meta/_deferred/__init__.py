"""Deferred init: build on meta while recording, materialize bit-identical to eager.

The rule: the deferred program is the eager program. Read top to bottom:
``_block`` (the ``deferred_init`` block: record, then swap fake tensors for
deferred meta tensors, in parameters, buffers and container attributes),
``_session`` (one recording: fake mode, recorder, hooks), ``_recorder`` (the
dispatch mode that logs every ATen call, phase by phase), ``_values``
(tensors to value ids), ``_lineage`` (what each storage depends on: random
draws, uninitialised memory), ``_rng`` (random numbers drawn for real while
recording, states set again while replaying), ``_functions`` (``.numpy()``
and ``.tolist()`` of fake tensors), ``_record_errors`` (what cannot be
recorded, and where it was issued), ``_escaped`` (fake tensors left outside
the modules), ``_record`` (the op log), ``_handles`` (the one owner of what
is pending and what is done), ``_materialize`` (the public ``materialize``),
``_fallback`` (``reset_parameters`` recorded, then replayed), ``_replay``
(re-running a slice of the log exactly, on private generators), ``_ambient``
(the settings that change values, noted per op and set again in replay),
``_load_hooks`` (``load_state_dict``
on deferred modules).
"""
