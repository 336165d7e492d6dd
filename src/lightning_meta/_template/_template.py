"""Meta-device templates that Lightning cannot see.

A :class:`MetaTemplate` keeps a meta-device module *outside* the module tree:
it is not an ``nn.Module``, so ``children()``, ``parameters()``,
``state_dict()``, ``.to()``, DDP and FSDP never reach it, and calling it runs
:func:`torch.func.functional_call` with tensors the caller owns.
"""

from __future__ import annotations

import copy
import functools
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

import torch
from torch import nn

from lightning_meta._arguments import build_on_meta, describe
from lightning_meta._compat import deepcopy_module, module_hooks, rebind_hook_closures
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError, MetaTensorError
from lightning_meta._slots import tie_groups

__all__ = ["MetaTemplate", "meta_template"]

Factory = Callable[[], nn.Module]
_T = TypeVar("_T")


def copy_module(module: nn.Module, make: Callable[[str, torch.Tensor], torch.Tensor]) -> nn.Module:
    """Deep-copy ``module``, replacing every parameter and buffer by ``make(name, t)``.

    The originals are handed to :func:`copy.deepcopy` through its memo, so no
    real tensor is ever duplicated and tensors shared between submodules (tied
    weights) stay shared in the copy.
    """
    memo: dict[int, Any] = {}
    for kind, named in (("param", module.named_parameters), ("buffer", module.named_buffers)):
        for name, tensor in named(remove_duplicate=True):
            new = make(name, tensor)
            if kind == "param" and not isinstance(new, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = new
    # Hooks that are functions closing over the module would still read the
    # original (deepcopy copies a function as is); bound methods move already.
    return deepcopy_module(module, memo)


def to_meta(module: nn.Module) -> nn.Module:
    """Return a meta-device copy of ``module`` without allocating real memory."""

    def make(name: str, tensor: torch.Tensor) -> torch.Tensor:
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(meta, requires_grad=tensor.requires_grad)
        return meta

    return copy_module(module, make)


def _build_on_meta(factory: Factory) -> nn.Module:
    module = build_on_meta(factory, "MetaTemplate factory")
    # A factory may capture modules or tensors built elsewhere; copy what is
    # not on meta so the template never aliases or holds real storage.
    if any(not t.is_meta for t in _tensors(module)):
        module = to_meta(module)
    return module


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


class MetaTemplate:
    """Hold a meta-device module where Lightning cannot see it, and call it functionally.

    The template is a plain Python object, not an ``nn.Module``: it is not in
    ``children()``, ``parameters()`` or ``state_dict()`` of the module that
    holds it, is never moved by ``.to()`` or ``.cpu()``, never wrapped by DDP
    or FSDP, and survives :func:`copy.deepcopy` and :mod:`pickle`. Calling it
    runs :func:`torch.func.functional_call` on the meta module with tensors
    the caller supplies, which is what ``torch.vmap`` ensembles,
    hypernetworks and meta-learning need.

    Args:
        module_or_factory: an ``nn.Module`` on any device, copied to meta
            (never aliased: the original is untouched and nothing of its size
            is allocated), or a zero-argument callable returning a module,
            called under ``torch.device("meta")``.
        cache: with a factory, build the module once (``True``) or on every
            access to :attr:`module` (``False``: nothing is kept between
            calls, the "build on demand" pattern). Must be ``True`` for a
            module argument.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning_meta as lm
        >>> template = lm.MetaTemplate(lambda: nn.Linear(3, 2))
        >>> template.module.weight.is_meta
        True
        >>> params = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
        >>> template(params, torch.ones(1, 3))
        tensor([[3., 3.]])

    .. warning::
        The template has its own ``training`` flag: the module holding it
        cannot switch it. Call :meth:`train` / :meth:`eval` on the template
        (as :class:`Ensemble` does) when its forward uses dropout or
        batch normalisation.
    """

    def __init__(self, module_or_factory: nn.Module | Factory, *, cache: bool = True) -> None:
        self._factory: Factory | None
        self._module: nn.Module | None
        self._training = True
        if isinstance(module_or_factory, nn.Module):
            if not cache:
                raise ArgumentValueError(
                    f"MetaTemplate({type(module_or_factory).__name__}, cache=False): a module "
                    "argument is copied once, so there is nothing to build on demand. Fix: "
                    "pass a factory (e.g. `lambda: MyNet(...)`) to use cache=False."
                )
            self._factory = None
            self._module = to_meta(module_or_factory)
            self._training = module_or_factory.training
        elif callable(module_or_factory):
            self._factory = module_or_factory
            # Built eagerly when cached so a broken factory fails where it is named.
            self._module = _build_on_meta(module_or_factory) if cache else None
        else:
            raise ArgumentTypeError(
                f"MetaTemplate expects an nn.Module or a zero-argument factory returning one, "
                f"got {type(module_or_factory).__name__}. Fix: pass the module or "
                "`lambda: MyNet(...)`."
            )
        self._cache = cache

    # ------------------------------------------------------------------ access
    @property
    def cache(self) -> bool:
        """Whether the meta module is built once and kept."""
        return self._cache

    @property
    def module(self) -> nn.Module:
        """The meta ``nn.Module`` (with ``cache=False``, a new one on every access)."""
        if self._module is not None or self._factory is None:  # a module was given: cached
            return typing.cast(nn.Module, self._module)
        module = _build_on_meta(self._factory)
        module.train(self._training)
        return module

    @property
    def training(self) -> bool:
        """The mode the template's forward runs in."""
        return self._training

    def train(self, mode: bool = True) -> MetaTemplate:
        """Set the mode the template's forward runs in and return the template."""
        self._training = mode
        if self._module is not None:
            self._module.train(mode)
        return self

    def eval(self) -> MetaTemplate:
        """Equivalent to ``train(False)``."""
        return self.train(False)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the shape of every parameter and buffer the template expects, by dotted name."""
        module = self.module
        out = {n: _shape(p) for n, p in module.named_parameters(remove_duplicate=False)}
        out.update({n: _shape(b) for n, b in module.named_buffers(remove_duplicate=False)})
        return out

    def state_from(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Collect the tensors of a real ``module`` that has this template's structure.

        Unlike ``dict(module.named_parameters())``, this follows
        reparametrisations: a weight pruned by ``torch.nn.utils.prune`` (as
        Lightning's ``ModelPruning`` does) is recomputed as ``weight_orig *
        weight_mask``, so gradients reach ``weight_orig``, and parametrised
        tensors (``torch.nn.utils.parametrize``) are evaluated.

        Args:
            module: the real module, e.g. the one the template was copied from.

        Returns:
            dotted name -> tensor, for every parameter and buffer of the template.

        Raises:
            MetaTensorError: ``module`` lacks one of the template's tensors.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> import lightning_meta as lm
            >>> net = nn.Linear(2, 2)
            >>> template = lm.MetaTemplate(net)
            >>> x = torch.ones(1, 2)
            >>> torch.equal(template(template.state_from(net), x), net(x))
            True
        """
        from torch.nn.utils import prune

        for sub in module.modules():
            for hook in list(module_hooks(sub)["forward pre-hooks"].values()):
                if isinstance(hook, prune.BasePruningMethod):
                    hook(sub, ())
        out: dict[str, torch.Tensor] = {}
        missing = []
        for name in self.shapes():
            prefix, _, leaf = name.rpartition(".")
            try:
                value = getattr(module.get_submodule(prefix), leaf)
            except AttributeError:
                missing.append(name)
                continue
            out[name] = value
        if missing:
            raise MetaTensorError(
                f"MetaTemplate.state_from({type(module).__name__}): the module lacks "
                f"{', '.join(repr(n) for n in missing)}. Fix: pass a module built like the template.",
                paths=missing,
            )
        return out

    # ---------------------------------------------------------------- calling
    def __call__(
        self, params_and_buffers: Mapping[str, torch.Tensor], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run the template's forward with ``params_and_buffers`` (see :meth:`functional_call`)."""
        return self.functional_call(params_and_buffers, args, kwargs)

    def functional_call(
        self,
        params_and_buffers: Mapping[str, torch.Tensor],
        args: Any = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        strict: bool = True,
        tie_weights: bool = True,
    ) -> Any:
        """Run the template's forward with the given tensors in place of its own.

        Args:
            params_and_buffers: dotted name -> tensor, for every parameter and
                buffer of the template (one name per group of tied tensors is
                enough with ``tie_weights=True``). Buffers may be omitted only
                when the template has none.
            args: positional inputs to ``forward`` (a single tensor is wrapped).
            kwargs: keyword inputs to ``forward``.
            strict: raise on missing, unexpected or mis-shaped entries
                (default). With ``False``, torch's own checks apply and
                omitted entries stay meta.
            tie_weights: as in :func:`torch.func.functional_call`.

        Returns:
            Whatever the template's ``forward`` returns.

        Raises:
            MetaTensorError: ``strict`` and an entry is missing, unexpected or
                of the wrong shape; every offending key is listed.
        """
        module = self.module
        if strict:
            self._check(module, params_and_buffers, tie_weights=tie_weights)
        if not isinstance(args, tuple):
            args = (args,)
        return torch.func.functional_call(
            module, dict(params_and_buffers), args, dict(kwargs or {}), tie_weights=tie_weights
        )

    def _check(
        self, module: nn.Module, given: Mapping[str, torch.Tensor], *, tie_weights: bool
    ) -> None:
        if not isinstance(given, Mapping):
            raise ArgumentTypeError(
                f"MetaTemplate({type(module).__name__}) expects a mapping of dotted names to "
                f"tensors as its first argument, got {type(given).__name__}. Fix: pass "
                "`dict(module.named_parameters())` or the output of a hypernetwork keyed by name."
            )
        # Every name of a group of tied tensors, so one of them satisfies the group.
        slots = [[s for s in g if s.kind != "attr"] for g in tie_groups(module)]
        expected = {s.path: _shape(s.tensor) for g in slots for s in g}
        problems: dict[str, str] = {}  # path -> what is wrong with it
        for group in slots:
            names = [s.path for s in group]
            present = [n for n in names if n in given]
            if not present or (not tie_weights and len(present) < len(names)):
                for n in names if not present else [n for n in names if n not in given]:
                    problems[n] = f"missing {n!r} (expected shape {expected[n]})"
        for name, value in given.items():
            if name not in expected:
                close = _closest(name, expected)
                hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
                problems[name] = f"unexpected {name!r}{hint}"
            elif not isinstance(value, torch.Tensor):
                problems[name] = f"{name!r} is {type(value).__name__}, expected a tensor"
            elif _shape(value) != expected[name]:
                problems[name] = f"{name!r} has shape {_shape(value)}, expected {expected[name]}"
        if problems:
            lines = "\n  ".join(sorted(problems.values()))
            raise MetaTensorError(
                f"MetaTemplate({type(module).__name__}) was called with parameters and buffers "
                f"that do not match it ({len(problems)} problem(s)):\n  {lines}\n"
                "Fix: pass one tensor per name in `template.shapes()` (under torch.vmap, the "
                "shape of one member), or call `template.functional_call(..., strict=False)`.",
                paths=problems,
            )

    # -------------------------------------------------------- copy and pickle
    def __deepcopy__(self, memo: dict[int, Any]) -> MetaTemplate:
        new = MetaTemplate.__new__(MetaTemplate)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        if self._module is not None and new._module is not None:
            # Hooks closing over this template would still read it.
            rebind_hook_closures(self._module, new._module, memo)
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["_module"] is not None:
            # A cached module is all that is needed; the factory may be a
            # lambda or closure that cannot be pickled.
            state["_factory"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        if self._module is not None:
            body = repr(self._module).replace("\n", "\n  ")
        else:
            body = f"factory={describe(self._factory)}"
        return f"MetaTemplate(cache={self._cache}, {body})"


def _closest(name: str, candidates: Mapping[str, object], n: int = 3) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


class _MetaTemplateProperty(Generic[_T]):
    """Descriptor behind :func:`meta_template`."""

    def __init__(self, builder: Callable[[Any], nn.Module], cache: bool) -> None:
        self._builder = builder
        self._cache = cache
        self._name = builder.__name__
        functools.update_wrapper(self, builder)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _MetaTemplateProperty[_T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> MetaTemplate: ...
    def __get__(
        self, instance: object | None, owner: type | None = None
    ) -> MetaTemplate | _MetaTemplateProperty[_T]:
        if instance is None:
            return self
        cached: dict[str, MetaTemplate] = instance.__dict__.setdefault("_meta_templates", {})
        template = cached.get(self._name) if self._cache else None
        if template is None:
            template = MetaTemplate(functools.partial(self._builder, instance))
            # The module is built; dropping the bound builder keeps the owner
            # out of the template, so pickling the template alone is cheap.
            template._factory = None
            if self._cache:
                cached[self._name] = template
        # Not a child module, so the owner's train()/eval() cannot reach the
        # template: follow the owner's mode on every access instead.
        return template.train(bool(getattr(instance, "training", True)))


@overload
def meta_template(builder: Callable[[Any], nn.Module], /) -> Any: ...
@overload
def meta_template(*, cache: bool = False) -> Callable[[Callable[[Any], nn.Module]], Any]: ...
def meta_template(
    builder: Callable[[Any], nn.Module] | None = None, /, *, cache: bool = False
) -> Any:
    """Turn a method that returns a fresh module into an attribute that yields a :class:`MetaTemplate`.

    Reading the attribute calls the method under ``torch.device("meta")`` and
    wraps the result in a :class:`MetaTemplate`, so the template is built on
    demand and never stored in the ``LightningModule``'s module tree,
    ``state_dict`` or checkpoint. The template runs in the owner's mode
    (``owner.training``) at the time of access, so ``model.eval()`` reaches it.

    Args:
        builder: the method; it receives ``self`` and returns an ``nn.Module``.
        cache: build once per instance and keep it (``True``), or build on
            every access (``False``, the default: nothing is kept between
            accesses, so deep copies and pickles of the owner carry nothing).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning_meta as lm
        >>> class HyperNet(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.hyper = nn.Linear(1, 3 * 2 + 2)
        ...
        ...     @lm.meta_template
        ...     def target(self):
        ...         return nn.Linear(3, 2)
        ...
        ...     def forward(self, z, x):
        ...         flat = self.hyper(z)
        ...         params = {"weight": flat[:6].view(2, 3), "bias": flat[6:]}
        ...         return self.target(params, x)
        >>> net = HyperNet()
        >>> net(torch.ones(1), torch.ones(4, 3)).shape
        torch.Size([4, 2])
        >>> [name for name, _ in net.named_parameters()]
        ['hyper.weight', 'hyper.bias']
    """

    def wrap(fn: Callable[[Any], nn.Module]) -> Any:
        if not callable(fn):
            raise ArgumentTypeError(
                f"@meta_template decorates a method returning an nn.Module, got "
                f"{type(fn).__name__}. Fix: put it on a `def name(self): return Module(...)`."
            )
        return _MetaTemplateProperty[Any](fn, cache)

    if builder is not None:
        return wrap(builder)
    return wrap
