"""Meta-device templates that Lightning cannot see.

A :class:`MetaTemplate` keeps a meta-device module *outside* the module tree:
it is not an ``nn.Module``, so ``children()``, ``parameters()``,
``state_dict()``, ``.to()``, DDP and FSDP never reach it, and calling it runs
:func:`torch.func.functional_call` with tensors the caller owns.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import pickle
import threading
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, SupportsIndex, TypeVar, overload

import torch
from torch import nn

from lightning_meta._arguments import build_on_meta, describe
from lightning_meta._compat import (
    deepcopy_module,
    module_hooks,
    no_dispatch_modes,
    rebind_hook_closures,
    recomputing_hooks,
)
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError, MetaTensorError
from lightning_meta._slots import named_tensors, tie_groups

__all__ = ["MetaTemplate", "TemplateState", "meta_template"]

Factory = Callable[[], nn.Module]
_T = TypeVar("_T")


def copy_module(
    module: nn.Module,
    make: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    memo: dict[int, Any] | None = None,
) -> nn.Module:
    """Deep-copy ``module``, replacing every parameter and buffer by ``make(name, t)``.

    The originals are handed to :func:`copy.deepcopy` through its memo, so no
    real tensor is ever duplicated and tensors shared between submodules (tied
    weights) stay shared in the copy. ``memo`` may hold more objects to
    replace (or keep, mapped to themselves).
    """
    memo = {} if memo is None else memo
    for kind, named in (("param", module.named_parameters), ("buffer", module.named_buffers)):
        for name, tensor in named(remove_duplicate=True):
            new = make(name, tensor)
            if kind == "param" and not isinstance(new, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = new
    _keep_outside_owners(module, memo)
    # Hooks that are functions closing over the module would still read the
    # original (deepcopy copies a function as is); bound methods of its own
    # submodules move with them.
    return deepcopy_module(module, memo)


def _keep_outside_owners(module: nn.Module, memo: dict[int, Any]) -> None:
    """Keep hooks that are bound methods of an object outside ``module`` as they are.

    ``copy.deepcopy`` copies a bound method with its ``__self__``: a hook
    ``self.gate_hook`` of the LightningModule on ``self.net`` would copy the
    whole LightningModule, real weights included, and then read a frozen
    copy of them. Like a closure over the owner (``rebind_hook_closures``),
    the hook keeps reading the live owner.
    """
    inside = {id(m) for m in module.modules()}
    for sub in module.modules():
        for table in module_hooks(sub).values():
            for hook in table.values():
                owner = getattr(hook, "__self__", None)
                if isinstance(hook, types.MethodType) and id(owner) not in inside:
                    memo[id(hook)] = hook


def to_meta(module: nn.Module) -> nn.Module:
    """Return a meta-device copy of ``module`` without allocating real memory.

    Raises:
        ArgumentValueError: ``module`` holds what cannot be copied (an
            uninitialised lazy parameter, a tensor attribute computed from a
            parameter, a lock), named by its dotted path.
    """
    lazy = [name for name, t in named_tensors(module).items() if torch.nn.parameter.is_lazy(t)]
    if lazy:
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): {', '.join(map(repr, lazy))} not "
            "initialised yet (a lazy module such as nn.LazyLinear), so it has no shape to "
            "copy. Fix: run one forward on an example batch before building the template, or "
            "pass a factory that builds the module with explicit sizes.",
            paths=lazy,
        )

    def make(name: str, tensor: torch.Tensor) -> torch.Tensor:
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(meta, requires_grad=tensor.requires_grad)
        return meta

    memo: dict[int, Any] = {}
    derived: list[str] = []
    for path, sub in module.named_modules():
        # The hook recomputes this attribute from the parameters before every
        # forward, so its value (a non-leaf deepcopy refuses) is never read.
        computed = set()
        for _, attr in recomputing_hooks(sub):
            value = vars(sub).get(attr)
            if isinstance(value, torch.Tensor):
                memo[id(value)] = torch.empty_like(value, device="meta")
                computed.add(attr)
        for attr, value in vars(sub).items():
            if (
                isinstance(value, torch.Tensor)
                and value.grad_fn is not None
                and attr not in computed
            ):
                derived.append(f"{path}.{attr}" if path else attr)
    if derived:
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): {', '.join(map(repr, derived))} is a "
            "tensor attribute computed from parameters (it has a grad_fn), which cannot be "
            "copied without its graph. Fix: compute it in forward, keep a detached copy "
            "(`t.detach()`), or register it as a buffer (`self.register_buffer(name, "
            "t.detach(), persistent=False)`).",
            paths=derived,
        )
    try:
        return copy_module(module, make, memo=memo)
    except MetaTensorError:
        raise
    except Exception as e:
        paths = _uncopyable(module, memo)
        where = ", ".join(map(repr, paths)) if paths else "an attribute"
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}) cannot copy {where}: "
            f"{type(e).__name__}: {e}. Fix: keep such objects (locks, open files, "
            "handles) out of the module, e.g. on the LightningModule that holds it, or pass "
            "a factory (`lambda: MyNet(...)`) that builds the template from scratch.",
            paths=paths,
        ) from e


def _uncopyable(module: nn.Module, memo: dict[int, Any]) -> list[str]:
    """Dotted paths of the attributes of ``module``'s submodules that deepcopy refuses."""
    found = []
    for path, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if attr in ("_parameters", "_buffers", "_modules") or isinstance(value, nn.Module):
                continue
            try:
                copy.deepcopy(value, dict(memo))
            except Exception:
                found.append(f"{path}.{attr}" if path else attr)
    return found


def _build_on_meta(factory: Factory) -> nn.Module:
    # The template is meta on purpose: a deferred_init block (or any dispatch
    # mode) around it must neither record its construction nor make it fake.
    with no_dispatch_modes():
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


class TemplateState(dict[str, torch.Tensor]):
    """What :meth:`MetaTemplate.state_from` returns: a ``dict`` of tensors by dotted name
    that also carries the source module's modes.

    ``modes`` maps each submodule path of the template to the ``training``
    flag of the matching submodule of the source; calling the template with
    this mapping runs every submodule in that mode, as the source's own
    forward would. A plain ``dict(...)`` or ``{**state}`` of it drops the
    modes; :meth:`copy` keeps them, and so does passing ``modes=`` to
    :meth:`MetaTemplate.functional_call`.
    """

    modes: dict[str, bool]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.modes = {}

    def copy(self) -> TemplateState:
        new = TemplateState(self)
        new.modes = dict(self.modes)
        return new


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
            (never aliased: the original is untouched; its parameters and
            buffers get no storage, tensors kept in plain attributes are
            copied as they are, and hooks that are methods or closures of an
            object outside the module keep reading that live object), or a
            zero-argument callable returning a module, called under
            ``torch.device("meta")`` (also inside a ``deferred_init`` block,
            which does not record it).
        cache: with a factory, build the module once (``True``) or on every
            access to :attr:`module` (``False``: nothing is kept between
            calls, the "build on demand" pattern; the factory must then be a
            module-level function for the template to pickle). Must be
            ``True`` for a module argument.

    Raises:
        MetaTensorError: the module holds what cannot be copied (a lazy
            parameter, a tensor attribute with a ``grad_fn``, a lock), named
            by its path; the factory fails or returns no module.

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
        The template is not a child module, so ``model.eval()`` (which
        Lightning calls for validate, test and predict) does not reach it.
        Call it with ``template.state_from(net)`` (or ``modes=net``) to run
        every submodule in ``net``'s mode, frozen submodules included. With
        a plain mapping (a hypernetwork's output) it runs in its own modes:
        those of the module it was copied from, or as set by :meth:`train` /
        :meth:`eval`.
    """

    def __init__(self, module_or_factory: nn.Module | Factory, *, cache: bool = True) -> None:
        self._factory: Factory | None
        self._module: nn.Module | None
        self._training = True
        # functional_call swaps tensors into the one cached module: calls from
        # several threads take turns.
        self._lock = threading.RLock()
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
        with self._serialized():
            self._training = mode
            if self._module is not None:
                self._module.train(mode)
        return self

    def _serialized(self) -> contextlib.AbstractContextManager[Any]:
        # A compiled graph takes the tensors as inputs and swaps nothing in;
        # dynamo could not trace the lock anyway.
        if self._module is None or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return self._lock

    def eval(self) -> MetaTemplate:
        """Equivalent to ``train(False)``."""
        return self.train(False)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the shape of every parameter and buffer the template expects, by dotted name."""
        module = self.module
        return {n: _shape(t) for n, t in named_tensors(module).items()}

    def state_from(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Collect the tensors of a real ``module`` that has this template's structure.

        Unlike ``dict(module.named_parameters())``, this follows
        reparametrisations as ``module``'s forward would: a weight pruned by
        ``torch.nn.utils.prune`` (as Lightning's ``ModelPruning`` does) or
        computed by the hook-based ``torch.nn.utils.weight_norm`` /
        ``spectral_norm`` is recomputed by its hook, so gradients reach
        ``weight_orig`` (``weight_g``, ``weight_v``), and parametrised tensors
        (``torch.nn.utils.parametrize``) are evaluated. Spectral norm's
        ``u`` / ``v`` are ``net``'s own buffers in the mapping: in training
        mode each template call advances them by one power iteration, as
        each call ``net(x)`` does, so ``template(template.state_from(net), x)``
        stands for one call ``net(x)``.

        The result also carries every submodule's ``training`` flag, so the
        template call runs each submodule in ``module``'s mode (``model.eval()``
        for validation reaches it; a frozen BatchNorm stays in eval).

        Args:
            module: the real module, e.g. the one the template was copied from.

        Returns:
            a :class:`TemplateState`: dotted name -> tensor, for every parameter
            and buffer of the template, and ``modes``, submodule path ->
            ``training``.

        Raises:
            MetaTensorError: ``module`` lacks one of the template's tensors or
                submodules.

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
        template = self.module
        out = TemplateState()
        missing = []
        for name in named_tensors(template):
            prefix, _, leaf = name.rpartition(".")
            try:
                sub = module.get_submodule(prefix)
                # A tensor recomputed by a forward pre-hook holds the value of
                # the last forward: run the hook as the forward would, so the
                # tensor is current and its gradient reaches what it is made of.
                for hook, attr in list(recomputing_hooks(sub)):
                    if attr == leaf:
                        hook(sub, ())
                out[name] = getattr(sub, leaf)
            except AttributeError:
                missing.append(name)
        template_paths = [p for p, _ in template.named_modules()]
        lacking = []
        for path in template_paths:
            try:
                out.modes[path] = module.get_submodule(path).training
            except AttributeError:
                lacking.append(path)
        if missing or lacking:
            listed = [*missing, *(f"{p} (a submodule)" for p in lacking)]
            raise MetaTensorError(
                f"MetaTemplate.state_from({type(module).__name__}): the module lacks "
                f"{', '.join(repr(n) for n in listed)}. Fix: pass a module built like the template.",
                paths=[*missing, *lacking],
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
        modes: Mapping[str, bool] | nn.Module | None = None,
    ) -> Any:
        """Run the template's forward with the given tensors in place of its own.

        Each submodule runs in the mode of the matching submodule of the
        source when modes are given (``modes``, or a mapping returned by
        :meth:`state_from`), and in the template's own mode otherwise; the
        template's modes are put back after the call.

        Calls from several threads are safe: on a cached template they take
        turns (the one meta module receives the tensors of one call at a
        time); with ``cache=False`` each call has a module of its own.

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
            modes: the module whose submodules' modes to run in (e.g. the real
                net the tensors come from), or submodule path -> ``training``.
                Defaults to the modes :meth:`state_from` attached to
                ``params_and_buffers``, if any.

        Returns:
            Whatever the template's ``forward`` returns.

        Raises:
            MetaTensorError: ``strict`` and an entry is missing, unexpected,
                of the wrong shape, or a tied name given a different tensor
                than its twin; every offending key is listed. ``modes`` lacks
                a submodule of the template.
        """
        module = self.module
        if strict:
            self._check(module, params_and_buffers, tie_weights=tie_weights)
        if modes is None:
            modes = getattr(params_and_buffers, "modes", None)
        if isinstance(modes, nn.Module):
            modes = {path: m.training for path, m in modes.named_modules()}
        if not isinstance(args, tuple):
            args = (args,)
        with self._serialized(), _computed_kept(module):
            with _modes_set(module, modes) if modes else contextlib.nullcontext():
                return torch.func.functional_call(
                    module,
                    dict(params_and_buffers),
                    args,
                    dict(kwargs or {}),
                    tie_weights=tie_weights,
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
            elif tie_weights and len({id(given[n]) for n in present}) > 1:
                problems[present[0]] = (
                    f"{', '.join(map(repr, present))} are tied in the template but were given "
                    "different tensors (pass one of them, or tie_weights=False to untie them)"
                )
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
        state.pop("_lock", None)
        if state["_module"] is not None:
            # A cached module is all that is needed; the factory may be a
            # lambda or closure that cannot be pickled.
            state["_factory"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __copy__(self) -> MetaTemplate:
        new = MetaTemplate.__new__(MetaTemplate)
        new.__setstate__(self.__getstate__())
        return new

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        factory = self.__dict__.get("_factory")
        if self.__dict__.get("_module") is None and isinstance(factory, types.FunctionType):
            # pickle names a function by its qualified name; a lambda or a
            # local function has none it can import, and the raw error would
            # not say that a template is the cause (ddp_spawn pickles the model).
            try:
                pickle.dumps(factory, int(protocol))
            except Exception as e:
                raise ArgumentValueError(
                    f"MetaTemplate(cache=False) with factory {describe(factory)!r} cannot be "
                    f"pickled ({type(e).__name__}: {e}), e.g. for strategy='ddp_spawn'. Fix: "
                    "make the factory a module-level function, or use cache=True (the built "
                    "module is pickled instead of the factory)."
                ) from e
        return super().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        if self._module is not None:
            body = repr(self._module).replace("\n", "\n  ")
        else:
            body = f"factory={describe(self._factory)}"
        return f"MetaTemplate(cache={self._cache}, {body})"


@contextlib.contextmanager
def _computed_kept(module: nn.Module) -> Iterator[None]:
    """Put back the attributes forward pre-hooks recompute (a pruned ``weight``) after the body.

    The hook stores the value computed from the caller's tensors on the
    template: kept, it would hold real memory and a graph (which deepcopy
    refuses) until the next call.
    """
    saved = [
        (sub, attr, vars(sub)[attr])
        for sub in module.modules()
        for _, attr in recomputing_hooks(sub)
        if attr in vars(sub)
    ]
    try:
        yield
    finally:
        for sub, attr, value in saved:
            setattr(sub, attr, value)


@contextlib.contextmanager
def _modes_set(module: nn.Module, modes: Mapping[str, bool]) -> Iterator[None]:
    """Run the body with each submodule of ``module`` in ``modes[path]``, then put back its own."""
    subs = dict(module.named_modules())
    lacking = sorted(set(subs) - set(modes))
    if lacking:
        raise MetaTensorError(
            f"MetaTemplate({type(module).__name__}) was given modes that lack the submodule(s) "
            f"{', '.join(map(repr, lacking))}. Fix: pass modes=<the module the tensors come "
            "from>, built like the template, or the mapping template.state_from(module) returns.",
            paths=lacking,
        )
    # Set directly, as Lightning restores modes: train() recurses and may be overridden.
    saved = {path: sub.training for path, sub in subs.items()}
    try:
        for path, sub in subs.items():
            sub.training = bool(modes[path])
        yield
    finally:
        for path, sub in subs.items():
            sub.training = saved[path]


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
    ``state_dict`` or checkpoint. Each access puts the whole template in the
    owner's mode (``owner.training``), so ``model.eval()`` reaches it when it
    is called with a plain mapping; called with ``template.state_from(net)``
    it runs each submodule in ``net``'s mode instead (a frozen BatchNorm of
    ``net`` stays in eval).

    .. warning::
        With ``cache=False`` every access builds a new module, so
        ``torch.compile`` recompiles on every call until its recompile limit.
        Under ``torch.compile`` use ``@lm.meta_template(cache=True)``.

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
