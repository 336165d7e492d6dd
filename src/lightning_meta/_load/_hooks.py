"""Modules with load code of their own: follow what ``load_state_dict`` would do, on a meta skeleton.

``Module.load_state_dict`` runs each module's ``_load_from_state_dict`` and
its load pre-hooks (which may rename keys: ``checkpoint_wrapper`` adds
``_checkpoint_wrapped_module.``, litgpt's LoRA maps ``qkv.weight`` to
``qkv.linear.weight``, or convert values: a quantize-on-load hook) and then
its load post-hooks (which may refresh derived buffers). The loader does not
go through ``load_state_dict``; for a module that has such code,
:func:`trace_load` runs it on a *skeleton*: a deep copy of the module whose
every tensor is a meta stand-in (no data copied), fed a state dict of meta
placeholders of the checkpoint's keys, under a
``torch.overrides.TorchFunctionMode`` that records every ``copy_`` into the
stand-ins. A tensor whose copy source is the placeholder of key ``K`` loads
from ``K`` (a rename); one filled from any other tensor (a value converted by
a hook) is refused. The module's post-hooks are not traced: they run for real
after the load (:func:`run_post_hooks`); run once more on the skeleton, they
tell which missing and unexpected keys they take off the lists
(:meth:`_Skeleton.post_hook_edits`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_meta import _compat
from lightning_meta._compat import is_dtensor
from lightning_meta._deferred._handles import ITEMS_ATTR
from lightning_meta._deferred._load_hooks import OWN_HOOKS
from lightning_meta._errors import MetaTensorError
from lightning_meta._load._source import Entry, Source, norm_fills_counter
from lightning_meta._slots import HANDLES_ATTR, children, iter_slots
from lightning_meta._watched import tensor_class

__all__ = [
    "WRAPPER_RENAMING",
    "LoadCode",
    "LoadFix",
    "describe_all",
    "load_code",
    "post_hooked",
    "renamings_only",
    "run_post_hooks",
    "skeleton_of",
    "trace_load",
    "unwrapped_name",
]


@dataclass
class LoadFix:
    """The fix a refusal of a module's own load code gives: that code run by
    ``load_state_dict`` on a real model, given this checkpoint's state dict.

    Attributes:
        source: the checkpoint.
        prefix: the key prefix the load strips, once detected.
        guess: the prefix for a refusal before it is detected (a module that
            cannot be copied), asked only then.
    """

    source: Source
    prefix: str | None = None
    guess: Callable[[], str] | None = None

    def text(self, module: nn.Module) -> str:
        """The fix for ``module``: a sharded one (DTensors: FSDP2, tensor parallel) is
        loaded before it is sharded, as its ``load_state_dict`` takes DTensors only, and
        torch's ``set_model_state_dict`` distributes only the keys the model has (a legacy
        key the load code renames stays whole) and fills missing ones from the model."""
        state = self._state_dict()
        if any(is_dtensor(s.tensor) for s in iter_slots(module)):
            return (
                "load it before sharding it: lm.materialize(model) (or build it for real), "
                f"then model.load_state_dict({state}), which runs that code, then call "
                "fully_shard or parallelize_module (each rank holds the whole model until then)"
            )
        return (
            "materialize the model (lm.materialize(model), or build it for real), then fill "
            f"it with model.load_state_dict({state}), which runs that code"
        )

    def _state_dict(self) -> str:
        """Python reading the checkpoint as ``module.load_state_dict`` takes it, or words
        saying how where no one expression does."""
        source, path = self.source, str(self.source.path)
        if source.format in ("torch", "lightning"):
            code = f"torch.load({path!r}, mmap=True, weights_only=True)"
        elif source.format == "torch-legacy":  # mmap needs the zip format
            code = f"torch.load({path!r}, weights_only=True)"
        elif source.format == "safetensors":
            code = f"safetensors.torch.load_file({path!r})"
        else:
            code = ""
        if code and source.under_state_dict:
            code += '["state_dict"]'
        prefix = self.prefix
        if prefix is None:
            prefix = self.guess() if self.guess is not None else ""
        if code and source.mapping is not None:
            # The prefix's parts that are nested mappings in the file are indexed
            # ({"model": {...}} gives keys "model.*"); a state dict nesting further
            # than the prefix is not one load_state_dict takes: said in words.
            mapping: Any = source.mapping
            while prefix:
                head, _, rest = prefix.partition(".")
                if not isinstance(mapping.get(head), Mapping):
                    break
                code += f"[{head!r}]"
                mapping, prefix = mapping[head], rest
            if any(isinstance(v, Mapping) for v in mapping.values()):
                code = ""
        if not code and source.format == "dcp":
            return _dcp_state_dict(prefix, source.under_state_dict)
        if not code:
            how = (
                "every shard's tensors in one dict"
                if source.format == "sharded"
                else "its nested mappings flattened to dotted keys, as state_dict gives them"
            )
            stripped = f", the prefix {prefix!r} stripped from its keys" if prefix else ""
            return f"the checkpoint's state dict ({how}{stripped})"
        if prefix:
            code = f"{{k.removeprefix({prefix!r}): v for k, v in {code}.items() if k.startswith({prefix!r})}}"
        return code


def _dcp_state_dict(prefix: str, lightning: bool) -> str:
    """Words for the state dict in a ``torch.distributed.checkpoint`` directory:
    ``dcp_to_torch_save`` writes the mapping as it was saved, nested (Lightning's
    ``{"state_dict": {"model.w": ...}}``, Fabric's ``{"model": {"w": ...}}``), which the
    directory's flat keys do not tell apart."""
    written = ("torch.distributed.checkpoint.format_utils.dcp_to_torch_save writes it as "
               "one torch file, its mappings nested as they were saved")  # fmt: skip
    if lightning:
        stripped = f", the prefix {prefix!r} stripped from its keys" if prefix else ""
        return f"the checkpoint's state dict ({written}: its ['state_dict']{stripped})"
    if not prefix:
        return f"the checkpoint's state dict ({written})"
    head = prefix.partition(".")[0]
    return (
        f"the checkpoint's state dict ({written}: the mapping under its {head!r}, as "
        f"Fabric's save of {{{head!r}: model}} holds it, or, where the keys hold the prefix "
        f"themselves, those keys with {prefix!r} stripped)"
    )


@dataclass(frozen=True)
class LoadCode:
    """A module with load code of its own: its path, class, and what it has."""

    path: str
    module: nn.Module
    what: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"{self.path or '<root>'!r} ({type(self.module).__qualname__}: {', '.join(self.what)})"
        )


def _own(hook: Any) -> bool:
    """Whether ``hook`` is bookkeeping the loader does itself: lightning_meta's own hooks on
    deferred modules, and FSDP2's (re-pad a shard, reshard before a load), which the sharded
    loader (:mod:`~lightning_meta._load._shards`) takes care of."""
    fn = _compat.hook_function(hook)
    return fn in OWN_HOOKS or str(getattr(fn, "__module__", "")).startswith(
        "torch.distributed.fsdp."
    )


def load_code(module: nn.Module) -> list[LoadCode]:
    """Every submodule (shared ones once) that has load code ``load_state_dict`` would run.

    That is an override of ``load_state_dict`` on ``module`` itself, of
    ``_load_from_state_dict`` (torch's own layers excepted: ``nn.BatchNorm``'s only fills the ``num_batches_tracked`` that
    checkpoints of older torch versions lack, which the plan does itself), a load pre-hook, or a load post-hook, lightning_meta's own hooks
    (on deferred modules) excepted.
    """
    found = []
    for path, mod in module.named_modules():
        what = []
        if not path:
            # Only the module loaded runs its own load_state_dict (a parent runs its
            # children's _load_from_state_dict): an override converting a legacy layout.
            entry = _compat.method_owner(mod, "load_state_dict")
            if entry is not nn.Module:
                what.append(f"{entry.__qualname__}.load_state_dict")
        owner = _compat.load_code_owner(mod)
        if owner is not nn.Module and not owner.__module__.startswith("torch.nn.modules."):
            what.append(f"{owner.__qualname__}._load_from_state_dict")
        pre, post = _compat.load_hook_tables(mod)
        theirs = [h for h in pre.values() if not _own(h)]
        if theirs and all(_wrapper_renaming(h) for h in theirs):
            what.append(WRAPPER_RENAMING)
        elif theirs:
            what.append("a load_state_dict pre-hook")
        if any(not _own(h) for h in post.values()):
            what.append("a load_state_dict post-hook")
        if what:
            found.append(LoadCode(path, mod, tuple(what)))
    return found


# What checkpoint_wrapper's load pre-hook does, and all it does: put back the
# "_checkpoint_wrapped_module." its state-dict hook takes out of every name.
WRAPPER_RENAMING = "checkpoint_wrapper's renaming"
_WRAPPED = "_checkpoint_wrapped_module."


def _wrapper_renaming(hook: Any) -> bool:
    fn = _compat.hook_function(hook)
    return (
        str(getattr(fn, "__module__", ""))
        == "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"
        and getattr(fn, "__name__", "") == "_pre_load_state_dict_hook"
    )


def renamings_only(code: list[LoadCode]) -> bool:
    """Whether the only load code is ``checkpoint_wrapper``'s renaming, which needs no trace
    on a deep copy of the model (which FSDP2 refuses: torchtitan's activation checkpointing
    under ``fully_shard``): :func:`unwrapped_name` is all it does."""
    return bool(code) and all(c.what == (WRAPPER_RENAMING,) for c in code)


def unwrapped_name(path: str) -> str:
    """``path`` as ``state_dict`` shows it and a checkpoint holds it: without the
    ``_checkpoint_wrapped_module.`` of every ``checkpoint_wrapper`` on the way."""
    return path.replace(_WRAPPED, "")


class _Skeleton:
    """The module's deep copy with meta stand-ins, and the way back to the module's names."""

    def __init__(self, module: nn.Module, where: str, code: list[LoadCode], fix: LoadFix) -> None:
        self.fix = fix
        memo: dict[int, Any] = {}
        self._display: dict[str, str] | None = None
        self.paths: dict[int, list[str]] = {}  # stand-in id -> walk names of its tensor
        for slot in iter_slots(module, remove_duplicate=False):
            t = slot.tensor
            if id(t) not in memo:
                memo[id(t)] = _standin(t)
            self.paths.setdefault(id(memo[id(t)]), []).append(slot.path)
        for mod in module.modules():
            for key, value in mod.__dict__.items():
                if isinstance(value, torch.Tensor) and id(value) not in memo:
                    memo[id(value)] = _standin(value)
                elif key in (HANDLES_ATTR, ITEMS_ATTR):
                    memo[id(value)] = {}  # deferred records: not copied, not needed
        self.standins = {id(v): v for v in memo.values() if isinstance(v, torch.Tensor)}
        try:
            self.module = _compat.deepcopy_module(module, memo)
        except Exception as e:  # user code: __deepcopy__, a lock, a file handle
            raise MetaTensorError(
                f"cannot load {where!r}: modules of this model have load code of their own "
                f"({describe_all(code)}), which load_checkpoint follows on a "
                f"meta copy of the model, but copying it failed ({type(e).__name__}: {e}); "
                f"nothing in the module was changed. Fix: {fix.text(module)}.",
                paths=[c.path for c in code],
            ) from e
        # Post-hooks run for real after the load; here only to learn which keys they
        # take off the lists (post_hook_edits), after the trace.
        self._post: list[tuple[dict[int, Any], dict[int, Any]]] = []
        for mod in self.module.modules():
            pre, post = _compat.load_hook_tables(mod)
            for hook_id in [k for k, h in pre.items() if _own(h)]:
                del pre[hook_id]
            if any(not _own(h) for h in post.values()):
                self._post.append((post, {k: h for k, h in post.items() if not _own(h)}))
            post.clear()
        self._traced: tuple[Any, list[str], list[str]] | None = None  # state, missing, unexpected

    def post_hook_edits(self) -> tuple[set[str], set[str], set[str], set[str]] | None:
        """What the load post-hooks do to ``load_state_dict``'s key lists, or ``None`` if unknown.

        torch hands every post-hook the missing and unexpected keys, which it
        may edit in place (an adapter dropping its own ``lora_*`` keys from
        the missing ones), and the strict check reads them afterwards. The
        traced load is run again on the skeleton with the post-hooks in place,
        each at the moment ``load_state_dict`` runs it; returns the missing
        keys (walk names) they removed and added, then the unexpected keys
        (checkpoint keys, prefix stripped) removed and added. ``None`` when
        the trace gave no lists or a post-hook fails on meta tensors.
        """
        if self._traced is None or not self._post:
            return None
        state, missing, unexpected = self._traced
        failed: list[BaseException] = []

        def guarded(hook: Any) -> Callable[..., Any]:
            def call(module: nn.Module, keys: Any) -> None:
                try:
                    hook(module, keys)
                except Exception as e:  # user code on meta tensors
                    failed.append(e)

            return call

        for table, hooks in self._post:
            table.update({k: guarded(h) for k, h in hooks.items()})
        try:
            after = self.module.load_state_dict(state, strict=False)
        except Exception:
            return None
        finally:
            for table, _ in self._post:
                table.clear()
        if failed:
            return None
        got_m, got_u = set(after.missing_keys), set(after.unexpected_keys)
        return (
            set(missing) - got_m,
            got_m - set(missing),
            set(unexpected) - got_u,
            got_u - set(unexpected),
        )

    def display(self) -> dict[str, str]:
        """Walk name to ``state_dict`` name, where a state-dict hook renames (checkpoint_wrapper)."""
        if self._display is None:
            self._display = self._names()
        return self._display

    def _names(self) -> dict[str, str]:
        try:
            state = self.module.state_dict(keep_vars=True)
        except Exception:  # a state-dict hook that cannot run on meta tensors: keep walk names
            return {}
        names: dict[int, list[str]] = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                names.setdefault(id(value), []).append(name)
        out = {}
        for sid, shown in names.items():
            walked = [p for p in self.paths.get(sid, ())]
            persistent = walked[: len(shown)] if len(walked) >= len(shown) else []
            for walk, name in zip(persistent, shown, strict=False):
                if walk != name:
                    out[walk] = name
        return out


def _standin(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``t``'s shape, dtype and class (a Parameter stays one)."""
    data = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
    if isinstance(t, nn.Parameter):
        try:
            return _compat.make_subclass(tensor_class(t), data, t.requires_grad)
        except Exception:
            return nn.Parameter(data, requires_grad=t.requires_grad)
    return data.requires_grad_(t.requires_grad) if t.requires_grad else data


class _CopyRecorder(TorchFunctionMode):  # type: ignore[misc]
    """Records every ``dst.copy_(src)`` (and ``.data =``, ``set_``) as ``(dst, src, prefix)``,
    ``prefix`` that of the module whose ``_load_from_state_dict`` runs it (``at[-1]``).

    It also counts how far each such call moved ``dst``'s version counter, so
    that a stand-in written by anything else (an in-place op on it or on a
    view of it, ``weight[:] = ...``) shows as a version count the recorded
    copies do not account for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.at: list[str] = []
        self.copies: list[tuple[Any, Any, str | None]] = []
        self.accounted: dict[int, int] = {}  # id(dst) -> version moves of its recorded copies

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in _RECORDED and len(args) >= 2 and isinstance(args[0], torch.Tensor):
            dst = args[0]
            self.copies.append((dst, args[1], self.at[-1] if self.at else None))
            before = _compat.version_of(dst)
            out = func(*args, **(kwargs or {}))
            moved = _compat.version_of(dst) - before
            self.accounted[id(dst)] = self.accounted.get(id(dst), 0) + moved
            return out
        return func(*args, **(kwargs or {}))


_RECORDED = (torch.Tensor.copy_, torch.Tensor.data.__set__, torch.Tensor.set_)  # type: ignore[attr-defined]

# Module attributes that are not the module's own state: its tensors and
# children (followed by the trace itself), and lightning_meta's records.
_NOT_STATE = frozenset({"_parameters", "_buffers", "_modules", HANDLES_ATTR, ITEMS_ATTR})


def _state_of(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """The module's non-tensor attributes: each value, and a shallow copy of a container."""
    out = {}
    for key, value in module.__dict__.items():
        # torch's hook tables (_forward_hooks, _state_dict_pre_hooks, ...) only: a
        # plain attribute such as ``self.hooked = True`` is state like any other.
        torch_table = key.startswith("_") and "hook" in key
        if key in _NOT_STATE or torch_table or isinstance(value, torch.Tensor):
            continue
        shallow = None
        if isinstance(value, (list, dict, set)):
            with contextlib.suppress(Exception):
                shallow = copy.copy(value)
        out[key] = (value, shallow)
    return out


def _same(before: tuple[Any, Any], after: tuple[Any, Any]) -> bool:
    (old, old_items), (new, _) = before, after
    if old is new:
        return old_items is None or _equal(old_items, new)
    return _equal(old, new)


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # a value whose == cannot answer: taken as changed
        return False


def _state_changes(skeleton: nn.Module, before: dict[int, Any]) -> list[tuple[str, str]]:
    """``(module path, attribute)`` for each non-tensor attribute the trace changed."""
    changed = []
    for path, mod in skeleton.named_modules():
        old = before.get(id(mod), {})
        new = _state_of(mod)
        for key in sorted({*old, *new}):
            if key not in old or key not in new or not _same(old[key], new[key]):
                changed.append((path, key))
    return changed


_META_COPY_WARNING = r"for .*: copying from a non-meta parameter in the checkpoint to a meta"


def trace_load(
    module: nn.Module,
    code: list[LoadCode],
    local: dict[str, Entry],
    where: str,
    skeleton: _Skeleton,
    saved_versions: Mapping[str, Any] | bool | None = True,
) -> dict[str, str]:
    """Run ``load_state_dict(strict=False)`` on the skeleton; return walk name to checkpoint key.

    Raises:
        MetaTensorError: the load code fills a tensor from a value it made
            (a conversion), replaces a tensor of the module, or fails on meta
            tensors; nothing in the module was changed.
    """
    placeholders: dict[str, torch.Tensor] = {}
    key_of: dict[int, str] = {}
    for key, entry in local.items():
        ph = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        placeholders[key] = ph
        key_of[id(ph)] = key
    state: Any = _with_metadata(placeholders, skeleton.module, saved_versions)
    recorder = _CopyRecorder()
    versions = {sid: _compat.version_of(t) for sid, t in skeleton.standins.items()}
    held = {id(m): _state_of(m) for m in skeleton.module.modules()}
    try:
        with (
            recorder,
            _compat.load_prefixes_seen(skeleton.module.modules(), recorder.at),
            warnings.catch_warnings(),
        ):
            # A real value copied into a stand-in (a norm layer's own counter) is
            # followed here; torch's warning that the copy does nothing is about the
            # meta copy, not the user's model.
            warnings.filterwarnings("ignore", message=_META_COPY_WARNING, category=UserWarning)
            keys = _load_without_strict(skeleton.module, state)
        if hasattr(keys, "missing_keys") and hasattr(keys, "unexpected_keys"):
            skeleton._traced = (state, list(keys.missing_keys), list(keys.unexpected_keys))
    except Exception as e:
        # torch's own "size mismatch" is reported by the plan (missing, unexpected).
        if not (isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in str(e)):
            raise load_code_refusal(
                module,
                skeleton.fix,
                where,
                code,
                f"running it on meta tensors raised {type(e).__name__}: {e}",
            ) from e
    attrs = _state_changes(skeleton.module, held)
    if attrs:
        changed = sorted({p for p, _ in attrs})
        owners = [c for c in code if any(_under(p, c.path) for p in changed)] or code
        shown = ", ".join(f"{(p + '.') if p else ''}{a}" for p, a in attrs[:6])
        raise load_code_refusal(
            module,
            skeleton.fix,
            where,
            owners,
            f"it changes the modules' own attributes ({shown}), which load_checkpoint "
            "follows only on a meta copy of the model and cannot carry over",
            paths=changed,
        )
    # A checkpoint tensor changed in place (sd[k].mul_(0.5), sd[k].data = ...) before
    # it is copied: its values are converted, not the file's.
    edited = sorted(
        key
        for key, ph in placeholders.items()
        if _compat.version_of(ph) != 0 or any(dst is ph for dst, _, _ in recorder.copies)
    )
    # A stand-in written other than by a recorded copy into it (through a view:
    # weight[:] = w.t(), an in-place op): views share their base's version counter.
    partly = sorted(
        p
        for sid, t in skeleton.standins.items()
        if _compat.version_of(t) - versions[sid] != recorder.accounted.get(sid, 0)
        for p in skeleton.paths.get(sid, [])
    )
    if edited or partly:
        bad = sorted({*edited, *partly})
        owners = [c for c in code if any(_under(p, c.path) for p in partly)] or code
        what = []
        if edited:
            what.append(f"it changes the checkpoint's tensors {edited} in place")
        if partly:
            what.append(f"it writes into {partly} other than by copying a checkpoint tensor whole")
        raise load_code_refusal(
            module,
            skeleton.fix,
            where,
            owners,
            " and ".join(what) + "; load_checkpoint copies only what the file holds",
            paths=bad,
        )
    sources: dict[str, str] = {}
    converted: dict[str, str] = {}
    for dst, src, at in recorder.copies:
        paths = skeleton.paths.get(id(dst))
        if paths is None:
            continue  # not a tensor of the module (a temporary of the hook)
        source = key_of.get(id(src)) if isinstance(src, torch.Tensor) else None
        for path in _copied_at(paths, at, source, skeleton):
            if source is None and _own_batch_counter(skeleton.module, path, src, local, state):
                continue  # the plan fills it as the norm layer does (_fill_batch_counters)
            if source is None:
                converted[path] = type(src).__name__
                sources.pop(path, None)
            else:
                sources[path] = source
                converted.pop(path, None)
    replaced = [
        s.path
        for s in iter_slots(skeleton.module, remove_duplicate=False)
        if id(s.tensor) not in skeleton.standins
    ]
    if converted or replaced:
        bad = sorted({*converted, *replaced})
        owners = [c for c in code if any(_under(p, c.path) for p in bad)] or code
        raise load_code_refusal(
            module,
            skeleton.fix,
            where,
            owners,
            f"it fills {bad} with values it computes (or replaces those tensors), not with "
            "the checkpoint's tensors as they are; load_checkpoint copies only what the "
            "file holds",
            paths=bad,
        )
    return sources


def _own_batch_counter(
    module: nn.Module, path: str, value: Any, local: Mapping[str, Entry], state: Any
) -> bool:
    """Whether ``value`` copied into ``path`` is the ``num_batches_tracked`` a norm layer's
    own load code puts in a state dict of an older version (or none) that lacks it:
    ``torch.tensor(0)`` where its counter is on meta, as the meta copy's is. Not a value
    load code computes, but the counter the plan fills the same way
    (``_fill_batch_counters``); any other value, or a file of version 2 or more, where the
    layer puts nothing in, is load code's own and refused."""
    owner, _, name = path.rpartition(".")
    if name != "num_batches_tracked" or path in local:
        return False
    if not (
        isinstance(value, torch.Tensor)
        and not value.is_meta
        and value.dtype == torch.long
        and value.dim() == 0
        and int(value) == 0
    ):
        return False
    if not norm_fills_counter(getattr(state, "_metadata", None), owner):
        return False
    try:
        return _compat.counts_batches(module.get_submodule(owner))
    except AttributeError:
        return False


def _load_without_strict(module: nn.Module, state: Any) -> Any:
    """``module.load_state_dict(state, strict=False)``; a root's own ``load_state_dict`` that
    takes no ``strict`` (``def load_state_dict(self, sd)``) is called with ``state`` alone,
    and what it returns is passed on as it is (``None`` from an override returning nothing)."""
    load = module.load_state_dict
    try:
        params = inspect.signature(load).parameters.values()
    except (TypeError, ValueError):  # no signature to read: call it as torch's
        return load(state, strict=False)
    if any(p.name == "strict" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return load(state, strict=False)
    return load(state)


def _copied_at(
    paths: list[str], at: str | None, source: str | None, skeleton: _Skeleton
) -> list[str]:
    """The names of a tensor that one copy into it loads, as ``load_state_dict`` sees it.

    A tied tensor is copied once per name, each time from that name's key:
    the copy belongs to the name(s) of the module whose
    ``_load_from_state_dict`` ran it (``at``), and of two names in that
    module to the one whose key it read. A copy made by other code (a
    parent's override filling a child's tensor) belongs to every name.
    """
    if at is None:
        return paths
    here = [p for p in paths if p.startswith(at) and "." not in p[len(at) :]]
    if len(here) > 1 and source is not None:
        read = [p for p in here if source in (p, skeleton.display().get(p, p))]
        here = read or here
    return here or paths


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def _with_metadata(
    placeholders: dict[str, torch.Tensor],
    skeleton: nn.Module,
    versions: Mapping[str, Any] | bool | None,
) -> Any:
    """The state dict the trace loads: ``placeholders`` with the ``_metadata`` eager's
    ``load_state_dict`` would hand each module's load code, whose conversions may depend on
    the version a module was saved with (``local_metadata["version"]``): the file's
    (``versions``, module paths relative to the module loaded), none where the file keeps
    none (safetensors: eager code then sees no version), or, for ``True``, the module's own
    (a format eager loads into ``model.state_dict()``). Before 2026-12-07 (third session)
    the module's own were used for every file, so code converting an older layout did not
    run in the trace: the weights came out unconverted, without an error."""
    from collections import OrderedDict

    state: Any = OrderedDict(placeholders)
    if versions is True:
        with contextlib.suppress(Exception):
            state._metadata = getattr(skeleton.state_dict(), "_metadata")  # noqa: B009
    elif isinstance(versions, Mapping):
        state._metadata = OrderedDict(versions)
    return state


def describe_all(code: list[LoadCode], most: int = 4) -> str:
    """The first ``most`` of ``code`` described, and how many more."""
    shown = "; ".join(c.describe() for c in code[:most])
    return shown + (f"; and {len(code) - most} more" if len(code) > most else "")


def load_code_refusal(
    module: nn.Module,
    fix: LoadFix,
    where: str,
    code: list[LoadCode],
    problem: str,
    paths: list[str] | None = None,
) -> MetaTensorError:
    listed = describe_all(code)
    return MetaTensorError(
        f"cannot load {where!r}: modules of this model have load code of their own that "
        f"load_state_dict runs ({listed}), and {problem}; nothing in the module was changed. "
        f"Fix: {fix.text(module)}.",
        paths=[*(paths or []), *(c.path for c in code)],
    )


def skeleton_of(module: nn.Module, where: str, code: list[LoadCode], fix: LoadFix) -> _Skeleton:
    """The meta skeleton of ``module`` (see :func:`trace_load`); ``fix``: the fix a
    refusal gives."""
    return _Skeleton(module, where, code, fix)


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    # As load_state_dict: every child (shared ones under each name) before its parent.
    for child in children(module):
        yield from _post_order(child)
    yield module


def run_post_hooks(
    module: nn.Module, missing: list[str], unexpected: list[str], fix: LoadFix
) -> tuple[list[str], list[str]]:
    """Run the module's own load post-hooks, children first, as ``load_state_dict`` does;
    ``fix``: the fix an error gives.

    Returns:
        The missing and unexpected keys, sorted, as the hooks left them (they
        may edit the lists in place; ``load_state_dict`` returns them so).

    Raises:
        MetaTensorError: a hook raised; the tensors are loaded, the hook's
            work may be partly done.
    """
    keys = _compat.incompatible_keys(list(missing), list(unexpected))
    for mod in _post_order(module):
        _, post = _compat.load_hook_tables(mod)
        hooks: list[Callable[..., Any]] = [h for h in list(post.values()) if not _own(h)]
        for hook in hooks:
            try:
                hook(mod, keys)
            except Exception as e:
                raise MetaTensorError(
                    f"the tensors were loaded, but the load_state_dict post-hook {hook!r} of "
                    f"{type(mod).__qualname__} raised {type(e).__name__}: {e}; what it "
                    f"refreshes may be left as it was. Fix: {fix.text(module)}.",
                    paths=[],
                ) from e
    return sorted(set(keys.missing_keys)), sorted(set(keys.unexpected_keys))


def post_hooked(code: list[LoadCode]) -> list[LoadCode]:
    """The modules of ``code`` that have a load post-hook."""
    return [c for c in code if "a load_state_dict post-hook" in c.what]
