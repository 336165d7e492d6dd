"""Loading: fill a meta, deferred or real module from any checkpoint at one copy of memory.

Read top to bottom: ``_checkpoint`` (``load_checkpoint``, phase by phase:
check arguments, open, plan, convert, replay, swap in, report), ``_formats``
(telling the format from the content), ``_source`` (what a checkpoint looks
like to the loader, and reading one torch or safetensors file), ``_sharded``
(a Hugging Face index, a distributed checkpoint), ``_match`` (keys, prefixes,
ties, shapes and the mismatch error), ``_report`` (``LoadReport`` and progress).
"""
