"""Templates, fifth hostile review (2026-12-05): other numbers than ``net(x)`` without an
error, and torch's errors where the package knows the cause.

- A plain meta tensor in the mapping beside real ones: torch's CPU matmuls returned
  uninitialised memory (about 1e22, or plausible repeats of an earlier output).
- A plain attribute sharing memory with a parameter (``self.readout =
  self.emb.weight.data``) was copied once: after training, the template's output differed.
- ``template(params, x, modes=net)`` passed ``modes`` to the forward, which a
  ``**kwargs`` forward (transformers) dropped: dropout stayed on.
- A factory's plain tensor attribute (built on meta), or a list holding the module's own
  buffer, failed every call with torch's device error.
- A mapping that makes a new view on every lookup (a hypernetwork's flat vector) was said
  to have had its tensors reassigned by the forward.
- A ``cache=False`` template whose factory is a ``functools.partial`` of a lambda, or a
  local class's instance, failed to pickle with Python's error.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterator, Mapping

import pytest
import torch
from torch import nn

import lightning_meta as lm


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_a_real_tensor_made_from_a_meta_one_in_the_mapping_is_refused_by_name() -> None:
    net = _mlp()
    template = lm.MetaTemplate(net)
    params = dict(net.named_parameters())
    params["2.weight"] = torch.empty(2, 8, device="meta")
    with pytest.raises(lm.MetaTensorError, match=r"made a real tensor from the mapping's '2.w"):
        template(params, torch.randn(3, 4))
    # all meta, inputs too: shapes only, as before
    meta = {k: torch.empty_like(v, device="meta") for k, v in net.named_parameters()}
    assert template(meta, torch.empty(3, 4, device="meta")).shape == (3, 2)


class _Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, ids: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.emb(ids).mean(1)) / temperature
        return out


def test_shape_probes_with_real_ids_and_real_scalars_still_run_on_meta() -> None:
    net = _Probe()
    template = lm.MetaTemplate(net)
    state = {k: torch.empty_like(v, device="meta") for k, v in net.state_dict().items()}
    state["bn.num_batches_tracked"] = torch.tensor(0)  # a real step count among meta ones
    out = template(state, torch.randint(0, 10, (3, 5)), torch.tensor(2.0))
    assert out.is_meta and out.shape == (3, 4)


class _Readout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.readout = self.emb.weight.data

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) @ self.readout.T


class _Grown(nn.Module):
    """A mask cache its forward grows on the input's device (a factory builds it on meta)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.mask = torch.ones(0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask.shape[0] < x.shape[0] or self.mask.device != x.device:
            self.mask = torch.ones(x.shape[0], 4, device=x.device)
        out: torch.Tensor = self.l(x) * self.mask[: x.shape[0]]
        return out


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        vectors = torch.randn(10, 4)
        self.emb = nn.Embedding.from_pretrained(vectors, freeze=True)
        self.vectors = vectors  # the frozen weight's memory
        self.register_buffer("full", torch.ones(8, 8))
        self.corner = self.full[:4, :4]  # a buffer's memory
        self.l = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.l(self.emb(ids)) @ self.corner + self.vectors[ids]
        return out


def test_factories_and_aliases_that_run_as_the_module_are_not_refused() -> None:
    grown = _Grown()
    x = torch.randn(3, 4)
    template = lm.MetaTemplate(_Grown)  # its meta mask is replaced before any use
    torch.testing.assert_close(template(dict(grown.named_parameters()), x), grown(x))
    pruned = nn.Sequential(nn.Linear(4, 4))
    torch.nn.utils.prune.l1_unstructured(pruned[0], "weight", amount=0.5)

    def build() -> nn.Module:
        module = nn.Sequential(nn.Linear(4, 4))
        torch.nn.utils.prune.l1_unstructured(module[0], "weight", amount=0.5)
        return module

    template = lm.MetaTemplate(build)  # prune's recomputed weight: replaced by its hook
    torch.testing.assert_close(template(template.state_from(pruned), x), pruned(x))
    frozen = _Frozen()
    ids = torch.tensor([1, 2, 3])
    template = lm.MetaTemplate(frozen)
    torch.testing.assert_close(template(template.state_from(frozen), ids), frozen(ids))


def test_a_plain_attribute_sharing_a_parameters_memory_is_refused_when_built() -> None:
    with pytest.raises(lm.ArgumentValueError, match=r"'readout' \(with 'emb.weight'\) share"):
        lm.MetaTemplate(_Readout())
    # A factory builds it on meta, where it holds no value: a real tensor @ it
    # gave uninitialised memory; refused when the call makes that real tensor.
    factory = lm.MetaTemplate(_Readout)
    net = _Readout()
    with pytest.raises(lm.MetaTensorError, match=r"made a real tensor from 'readout' \(meta"):
        factory(dict(net.named_parameters()), torch.tensor([1, 2]))
    # a copy of its own is no alias: kept as before
    net = _Readout()
    net.readout = net.readout.clone()
    lm.MetaTemplate(net)


class _Dropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        out: torch.Tensor = self.drop(self.l(x))
        return out


class _TakesModes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, modes: object = None) -> torch.Tensor:
        out: torch.Tensor = self.l(x)
        return out


def test_modes_as_a_keyword_of_the_call_is_refused_unless_the_forward_takes_it() -> None:
    net = _Dropping()
    template = lm.MetaTemplate(net)  # copied in train mode
    net.eval()
    params = dict(net.named_parameters())
    x = torch.randn(3, 4)
    with pytest.raises(lm.ArgumentValueError, match=r"passes modes= to the forward"):
        template(params, x, modes=net)
    out = template.functional_call(params, (x,), modes=net)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    takes = _TakesModes()
    lm.MetaTemplate(takes)(dict(takes.named_parameters()), x, modes=takes)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.temperature = torch.tensor(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.l(x) / self.temperature
        return out


class _Listed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.register_buffer("mask", torch.ones(4))
        self.cache = [self.mask]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.l(x) * self.cache[0]
        return out


def test_meta_tensors_outside_the_tables_are_refused_by_name() -> None:
    x = torch.randn(3, 4)
    scaled = _Scaled()
    for template in (lm.MetaTemplate(_Scaled), lm.MetaTemplate(_Scaled, cache=False)):
        with pytest.raises(lm.MetaTensorError, match=r"'temperature'"):
            template(dict(scaled.named_parameters()), x)
    torch.testing.assert_close(
        lm.MetaTemplate(scaled)(dict(scaled.named_parameters()), x), scaled(x), rtol=0, atol=0
    )
    listed = _Listed()
    template = lm.MetaTemplate(listed)
    with pytest.raises(lm.MetaTensorError, match=r"the template holds 'cache\[0\]' outside"):
        template(template.state_from(listed), x)


class _Flat(Mapping[str, torch.Tensor]):
    """A hypernetwork's output: one flat vector, viewed per name on each lookup."""

    def __init__(self, flat: torch.Tensor, shapes: dict[str, torch.Size]) -> None:
        self.flat, self.shapes = flat, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        start = 0
        for key, shape in self.shapes.items():
            size = shape.numel()
            if key == name:
                return self.flat[start : start + size].view(shape)
            start += size
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def test_a_mapping_viewing_a_flat_vector_is_not_taken_for_reassigned_buffers() -> None:
    net = _mlp()
    template = lm.MetaTemplate(net)
    shapes = {k: v.shape for k, v in net.named_parameters()}
    flat = torch.cat([p.detach().flatten() for p in net.parameters()]).requires_grad_()
    x = torch.randn(3, 4)
    out = template(_Flat(flat, shapes), x)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    out.sum().backward()
    assert flat.grad is not None


def _build(width: int) -> nn.Module:
    return nn.Linear(width, 2)


def test_an_unpicklable_factory_of_any_kind_is_named() -> None:
    class Factory:
        def __call__(self) -> nn.Module:
            return nn.Linear(4, 2)

    for factory in (functools.partial(lambda: nn.Linear(4, 2)), Factory()):
        template = lm.MetaTemplate(factory, cache=False)
        with pytest.raises(lm.ArgumentValueError, match=r"cannot be pickled"):
            pickle.dumps(template)
    template = lm.MetaTemplate(functools.partial(_build, 4), cache=False)
    assert pickle.loads(pickle.dumps(template)).module.in_features == 4
