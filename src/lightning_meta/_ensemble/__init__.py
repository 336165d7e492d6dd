"""Ensembles: N same-shaped modules as stacked real tensors plus one template.

Modules: ``_ensemble`` (the ``Ensemble`` module), ``_fused`` (batched-matmul
execution for ``nn.Sequential`` MLPs).
"""
