"""Loading: fill a meta, deferred or real module from any checkpoint at one copy of memory.

Read top to bottom: ``_checkpoint`` (``load_checkpoint``, phase by phase:
check arguments, open, plan, convert, replay, swap in, report), ``_formats``
(telling the format from the content), ``_source`` (what a checkpoint looks
like to the loader; torch and safetensors files), ``_sharded`` (a Hugging
Face index, a distributed checkpoint), ``_torchfile`` (torch zip and legacy
files read without ``torch.load``), ``_unpickle`` (unpickling that runs no
code), ``_files`` (reading bytes into memory the process owns, every size
checked), ``_match`` (keys, prefixes, ties, shapes and the refusals),
``_report`` (``LoadReport`` and progress).
"""
