"""Ensembles: N same-shaped modules as stacked real tensors plus one template.

Modules: ``_ensemble`` (the ``Ensemble`` module), ``_plan`` (choosing a plan
per kind of call, by timing), and the plans: ``_fused`` (batched matmuls for
``nn.Sequential`` MLPs), ``_grouped`` (members' channels side by side:
grouped convolutions, BatchNorm over stacked channels), ``_loop`` (a loop over
member views of the stacked tensors); ``_grads`` (gradient memory reused
across steps). ``torch.vmap`` is the fourth plan.
"""
