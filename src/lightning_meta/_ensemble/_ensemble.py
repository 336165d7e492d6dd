"""Ensembles: N same-shaped modules as stacked real tensors plus one meta template."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_meta._compat import tree_map, tree_map_only
from lightning_meta._ensemble._fused import FusedPlan, NotFusableError, plan_fused
from lightning_meta._errors import MetaTensorError
from lightning_meta._slots import slot_at
from lightning_meta._template._template import MetaTemplate, copy_module

__all__ = ["Ensemble"]

Execution = Literal["auto", "fused", "vmap", "loop"]
Randomness = Literal["different", "same", "error"]
_EXECUTIONS = ("auto", "fused", "vmap", "loop")
_RANDOMNESS = ("different", "same", "error")


def _slicer(start: int, stop: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x[start:stop]``, or ``x[start]`` when ``stop`` is None, along dim 0."""
    if stop is None:
        return lambda x: x[start]
    return lambda x: x[start:stop]


class _Stacked(nn.Module):
    """Holds the stacked tensors of one submodule of the template.

    Reading them through ``__call__`` runs this module's forward pre-hooks, so
    reparametrisations that live in hooks (``torch.nn.utils.prune``, as used
    by Lightning's ``ModelPruning``) are applied before every forward.
    """

    def __init__(self, leaves: Sequence[str] = ()) -> None:
        super().__init__()
        self.leaves: tuple[str, ...] = tuple(leaves)

    def forward(self) -> dict[str, torch.Tensor]:
        return {leaf: getattr(self, leaf) for leaf in self.leaves}


def _signature(module: nn.Module) -> dict[str, tuple[str, tuple[int, ...], torch.dtype, bool]]:
    sig: dict[str, tuple[str, tuple[int, ...], torch.dtype, bool]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        sig[name] = ("parameter", tuple(p.shape), p.dtype, p.requires_grad)
    for name, b in module.named_buffers(remove_duplicate=False):
        sig[name] = ("buffer", tuple(b.shape), b.dtype, False)
    return sig


def _ties(module: nn.Module) -> list[tuple[str, ...]]:
    groups: dict[int, list[str]] = {}
    for name, t in [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]:
        groups.setdefault(id(t), []).append(name)
    return sorted(tuple(g) for g in groups.values() if len(g) > 1)


def _compare(reference: nn.Module, other: nn.Module, index: int) -> list[str]:
    """Every way ``other`` (member ``index``) differs from member 0."""
    if type(other) is not type(reference):
        return [f"member {index} is {type(other).__qualname__}, member 0 is "
                f"{type(reference).__qualname__}"]
    ref, sig = _signature(reference), _signature(other)
    problems = [f"member {index} lacks {n!r} {ref[n][1]}" for n in ref if n not in sig]
    problems += [f"member {index} has extra {n!r} {sig[n][1]}" for n in sig if n not in ref]
    for name in sorted(ref.keys() & sig.keys()):
        (kind_a, shape_a, dtype_a, grad_a), (kind_b, shape_b, dtype_b, grad_b) = ref[name], sig[name]
        if (kind_a, shape_a, dtype_a) != (kind_b, shape_b, dtype_b):
            problems.append(
                f"member {index}: {kind_b} {name!r} is {shape_b} {dtype_b}, member 0 has "
                f"{'' if kind_a == kind_b else kind_a + ' '}{shape_a} {dtype_a}"
            )
        elif grad_a != grad_b:
            problems.append(
                f"member {index}: {name!r} has requires_grad={grad_b}, member 0 has {grad_a}"
            )
    if _ties(other) != _ties(reference):
        problems.append(f"member {index} ties {_ties(other)}, member 0 ties {_ties(reference)}")
    if not problems:
        # Same tensors, other settings (a dropout rate, an activation's slope):
        # the template is member 0, so the difference would be lost silently.
        for mine, theirs in zip(repr(reference).splitlines(), repr(other).splitlines(), strict=False):
            if mine != theirs:
                problems.append(f"member {index} has {theirs.strip()!r} where member 0 has "
                                f"{mine.strip()!r}")
                break
    return problems


class Ensemble(nn.Module):
    """Run N same-shaped modules as one, with stacked real parameters and a meta template.

    The ensemble holds one real parameter (or buffer) per parameter of the
    members, stacked on a new dim 0 of size N, and a :class:`MetaTemplate` of
    the members' architecture. Lightning, optimizers, checkpoints,
    ``ModelSummary``, DDP, FSDP and precision plugins therefore see ordinary
    parameters, with readable keys such as ``stacked.0.weight`` of shape
    ``(N, out, in)``.

    Args:
        modules: the members: same class, same parameter and buffer names,
            shapes, dtypes and weight ties, on one device. Their values are
            copied; the modules themselves are not kept.
        per_member_inputs: ``False`` (default): every member gets the same
            inputs. ``True``: tensor inputs are stacked on dim 0, one slice per
            member.
        randomness: ``torch.vmap`` randomness. ``"different"`` (default) gives
            each member its own dropout mask, as N separate modules would;
            ``"same"`` shares one; ``"error"`` refuses random operations.
        chunk_size: run at most this many members at a time, to bound
            activation memory (default: all at once).
        execution: ``"auto"`` (default) uses a batched-matmul path for
            ``nn.Sequential`` stacks of ``nn.Linear`` and element-wise
            activations, and ``torch.vmap`` otherwise; ``"fused"``, ``"vmap"``
            and ``"loop"`` (a Python loop over members) force one. All agree
            with a loop over the original modules up to floating-point
            reassociation.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning_meta as lm
        >>> members = [nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)) for _ in range(4)]
        >>> ensemble = lm.Ensemble(members)
        >>> x = torch.randn(5, 3)
        >>> ensemble(x).shape
        torch.Size([4, 5, 1])
        >>> torch.testing.assert_close(ensemble(x), torch.stack([m(x) for m in members]))
        >>> sorted(k for k in ensemble.state_dict())
        ['stacked.0.bias', 'stacked.0.weight', 'stacked.2.bias', 'stacked.2.weight']

    .. warning::
        Members are copied when the ensemble is built: training the ensemble
        does not change the original modules. Use :meth:`member` to get a
        real module back.
    """

    def __init__(
        self,
        modules: Iterable[nn.Module],
        *,
        per_member_inputs: bool = False,
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        execution: Execution = "auto",
    ) -> None:
        super().__init__()
        if isinstance(modules, nn.Module) and not isinstance(modules, (nn.ModuleList, nn.Sequential)):
            raise MetaTensorError(
                f"Ensemble expects a sequence of modules, got one {type(modules).__name__}. "
                "Fix: `Ensemble([m1, m2, ...])` or `Ensemble.from_factory(make, n)`."
            )
        members = list(modules)
        self._setup(len(members), members[0] if members else None, per_member_inputs,
                    randomness, chunk_size, execution)
        for i, member in enumerate(members):
            self._store(i, member, reference=members[0])

    @classmethod
    def from_factory(
        cls, factory: Callable[[], nn.Module], num_members: int, **options: Any
    ) -> Ensemble:
        """Build an ensemble of ``num_members`` modules made by ``factory``, one at a time.

        Only one member exists besides the stacked tensors at any moment, so
        peak memory is the ensemble plus one member (a list would need N).
        ``options`` are those of :class:`Ensemble`.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> import lightning_meta as lm
            >>> ens = lm.Ensemble.from_factory(lambda: nn.Linear(3, 2), 8)
            >>> len(ens), ens.stacked.weight.shape
            (8, torch.Size([8, 2, 3]))
        """
        if not isinstance(num_members, int) or num_members < 1:
            raise MetaTensorError(
                f"Ensemble.from_factory needs num_members >= 1, got {num_members!r}."
            )
        first = factory()
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(num_members, first, **options)
        self._store(0, first, reference=first)
        for i in range(1, num_members):
            self._store(i, factory(), reference=first)
        return self

    # ---------------------------------------------------------------- set-up
    def _setup(
        self,
        n: int,
        first: nn.Module | None,
        per_member_inputs: bool = False,
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        execution: Execution = "auto",
    ) -> None:
        if first is None or n < 1:
            raise MetaTensorError(
                "Ensemble got no members. Fix: pass at least one module."
            )
        if not isinstance(first, nn.Module):
            raise MetaTensorError(
                f"Ensemble member 0 is {type(first).__name__}, expected an nn.Module."
            )
        if randomness not in _RANDOMNESS:
            raise MetaTensorError(f"Ensemble randomness={randomness!r}; choose one of {_RANDOMNESS}.")
        if execution not in _EXECUTIONS:
            raise MetaTensorError(f"Ensemble execution={execution!r}; choose one of {_EXECUTIONS}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise MetaTensorError(f"Ensemble chunk_size={chunk_size!r}; expected None or an int >= 1.")
        self.num_members = n
        self.per_member_inputs = per_member_inputs
        self.randomness: Randomness = randomness
        self.chunk_size = chunk_size
        self.template = MetaTemplate(first)
        self.template.train(self.training)
        template = self.template.module
        # One stacked tensor per distinct tensor of the template; tied names
        # are filled in by functional_call(tie_weights=True).
        self._names: list[str] = [name for name, _ in template.named_parameters()]
        self._names += [name for name, _ in template.named_buffers()]
        self.stacked = _Stacked()
        for name, t in [*template.named_parameters(), *template.named_buffers()]:
            holder = self._holder(name.rpartition(".")[0])
            leaf = name.rpartition(".")[2]
            ref = first.get_parameter(name) if isinstance(t, nn.Parameter) else first.get_buffer(name)
            if ref.is_meta:
                raise MetaTensorError(
                    f"Ensemble member 0 holds {name!r} on the meta device. Members must hold "
                    "real tensors. Fix: build them normally, or use Ensemble.from_factory."
                )
            data = torch.empty((n, *t.shape), dtype=t.dtype, device=ref.device)
            if isinstance(t, nn.Parameter):
                holder.register_parameter(leaf, nn.Parameter(data, requires_grad=t.requires_grad))
            else:
                slot = slot_at(first.get_submodule(name.rpartition(".")[0]), leaf)
                persistent = slot is None or slot.persistent
                holder.register_buffer(leaf, data, persistent=persistent)
            holder.leaves = (*holder.leaves, leaf)
        fused = plan_fused(template, randomness)
        if execution == "fused" and fused is None:
            raise MetaTensorError(
                f"Ensemble(execution='fused') needs an nn.Sequential of nn.Linear and "
                f"element-wise activations, got {type(template).__name__}. Fix: use "
                "execution='auto' or 'vmap'."
            )
        self._fused: FusedPlan | None = fused if execution in ("auto", "fused") else None
        self.execution: Execution = (
            ("fused" if fused is not None else "vmap") if execution == "auto" else execution
        )

    def _holder(self, path: str) -> _Stacked:
        holder = self.stacked
        for part in path.split(".") if path else ():
            child = dict(holder.named_children()).get(part)
            if child is None:
                child = _Stacked()
                holder.add_module(part, child)
            assert isinstance(child, _Stacked)
            holder = child
        return holder

    @torch.no_grad()
    def _store(self, index: int, member: nn.Module, *, reference: nn.Module) -> None:
        problems = _compare(reference, member, index) if member is not reference else []
        if problems:
            lines = "\n  ".join(problems)
            raise MetaTensorError(
                f"Ensemble members must have the same architecture as member 0 "
                f"({type(reference).__qualname__}):\n  {lines}\nFix: build every member "
                "with the same class and configuration."
            )
        stacked = self.tensors()
        sources: dict[str, torch.Tensor] = dict(member.named_parameters(remove_duplicate=False))
        sources.update(member.named_buffers(remove_duplicate=False))
        for name in self._names:
            src = sources[name]
            if src.is_meta:
                raise MetaTensorError(
                    f"Ensemble member {index} holds {name!r} on the meta device. Fix: pass "
                    "members with real tensors."
                )
            if src.device != stacked[name].device:
                raise MetaTensorError(
                    f"Ensemble member {index} holds {name!r} on {src.device}, member 0 on "
                    f"{stacked[name].device}. Fix: move every member to one device first."
                )
            stacked[name][index].copy_(src)

    # --------------------------------------------------------------- access
    def __len__(self) -> int:
        return self.num_members

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the stacked tensors by the template's dotted names (pre-hooks applied)."""
        out: dict[str, torch.Tensor] = {}
        for path, holder in self.stacked.named_modules():
            assert isinstance(holder, _Stacked)
            if holder.leaves:
                prefix = f"{path}." if path else ""
                out.update({prefix + k: v for k, v in holder().items()})
        return out

    def member(self, index: int) -> nn.Module:
        """Return member ``index`` as a real, independent module (a copy, on the ensemble's device).

        Raises:
            MetaTensorError: ``index`` is out of range.
        """
        if not -self.num_members <= index < self.num_members:
            raise MetaTensorError(
                f"Ensemble.member({index}) is out of range for {self.num_members} members."
            )
        tensors = self.tensors()
        module = copy_module(
            self.template.module, lambda name, t: tensors[name][index].detach().clone()
        )
        return module.train(self.training)

    def train(self, mode: bool = True) -> Ensemble:
        super().train(mode)
        self.template.train(mode)
        return self

    # -------------------------------------------------------------- forward
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Run every member on ``inputs`` and stack the outputs on a new dim 0 of size N."""
        tensors = self.tensors()
        if self._fused is not None and not kwargs:
            return self._chunked(tensors, inputs, self._fused_call)
        if self.execution == "loop":
            return self._loop(tensors, inputs, kwargs)
        return self._chunked(tensors, inputs, lambda t, x: self._vmap(t, x, kwargs))

    def _chunked(
        self,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        run: Callable[[dict[str, torch.Tensor], tuple[Any, ...]], Any],
    ) -> Any:
        size = self.chunk_size
        if size is None or size >= self.num_members:
            return run(tensors, inputs)
        outs = []
        for start in range(0, self.num_members, size):
            part = {k: v[start:start + size] for k, v in tensors.items()}
            xs = inputs
            if self.per_member_inputs:
                xs = tree_map_only(torch.Tensor, _slicer(start, start + size), inputs)
            outs.append(run(part, xs))
        return tree_map(lambda *parts: torch.cat(parts), *outs)

    def _fused_call(self, tensors: dict[str, torch.Tensor], inputs: tuple[Any, ...]) -> Any:
        assert self._fused is not None
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            return self._vmap(tensors, inputs, {})
        try:
            return self._fused(self.template.module, tensors, inputs[0], self.per_member_inputs)
        except NotFusableError:
            # Same function, computed member by member: torch reports any
            # shape error in the member's own terms.
            return self._vmap(tensors, inputs, {})

    def _vmap(
        self, tensors: dict[str, torch.Tensor], inputs: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        template = self.template

        def one(t: dict[str, torch.Tensor], *xs: Any) -> Any:
            return template.functional_call(t, xs, kwargs, strict=False)

        in_dims = (0, *([0 if self.per_member_inputs else None] * len(inputs)))
        return torch.vmap(one, in_dims=in_dims, randomness=self.randomness)(tensors, *inputs)

    def _loop(
        self, tensors: dict[str, torch.Tensor], inputs: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        outs = []
        for i in range(self.num_members):
            xs = inputs
            if self.per_member_inputs:
                xs = tree_map_only(torch.Tensor, _slicer(i, None), inputs)
            params = {k: v[i] for k, v in tensors.items()}
            outs.append(self.template.functional_call(params, xs, kwargs, strict=False))
        return tree_map(lambda *o: torch.stack(o), *outs)

    def extra_repr(self) -> str:
        arch = type(self.template.module).__name__
        return (
            f"num_members={self.num_members}, template={arch}, execution={self.execution!r}, "
            f"randomness={self.randomness!r}, per_member_inputs={self.per_member_inputs}"
        )
