"""Templates: meta-device copies of a module that Lightning cannot see (``MetaTemplate``, ``meta_template``).

Modules: ``_template`` (the template and its strict functional call).
"""
