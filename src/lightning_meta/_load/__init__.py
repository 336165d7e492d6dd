"""Loading: fill a meta, deferred or real module from any checkpoint at one copy of memory.

Read top to bottom: ``_checkpoint`` (``load_checkpoint``: open, plan, convert,
swap), ``_formats`` (reading every format), ``_match`` (keys, prefixes, ties,
shapes and the mismatch message), ``_report`` (``LoadReport`` and progress).
"""
