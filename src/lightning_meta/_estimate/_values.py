"""Values a simulated step knows: its inputs, and what it computes from them and constants alone.

A shape-only step cannot follow code that reads a tensor's value (``.item()``,
``bool(t)``, ``t.tolist()``, ``x in t``), yet models read values that do not
depend on their weights: transformers' BERT asks whether the last token of
``input_ids`` is padding, and whether an all-ones attention mask can be
dropped. :class:`Values` follows such tensors with small real *shadows* on the
CPU:

* an input tensor given for real keeps its values; an input given by shape (an
  :class:`~lightning_meta.InputSpec`, a ``"SHAPE:DTYPE"`` string or a meta
  tensor) is zeros;
* an operator whose tensor arguments all have values (or that has none:
  ``torch.arange``, ``torch.ones``) is run on the shadows too, and its outputs
  get the results; a seeded random operator is not (its value is not known,
  and drawing would move the generator);
* an index whose values are known (token ids given for real, positions built
  with ``torch.arange``) is checked against the size it indexes, as the real
  kernel does (``embedding``, ``index_select``, ``gather``, ``index``,
  ``nll_loss``): one out of range raises :class:`IndexRefusal`; indices
  given by shape read as zeros, and nothing is known of indices computed
  from weights, so those are not checked;
* reading a value (``aten._local_scalar_dense``, which ``.item()``,
  ``bool()``, ``tolist()`` and ``in`` all reach, ``torch.equal`` and
  ``torch.allclose``) is answered from the shadows; a data-dependent output shape (``nonzero``) is taken from it, and
  a boolean mask of known values indexes any tensor (``logits[labels !=
  -100]``): it becomes the integer indices of its true elements.

Parameters and buffers never have values (they are never read), nor has
anything computed from them: reading those still fails with the named
:class:`~lightning_meta.MetaTensorError`. An in-place write of unknown values
into a tensor with a shadow drops the shadows of its whole storage. Tensors
of more than :data:`MAX_ELEMENTS` elements are not followed (a causal mask of
a long sequence, a batch of images): reading them fails the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lightning_meta import _compat
from lightning_meta._compat import FakeTensor, no_dispatch_modes, tree_leaves, tree_map

__all__ = ["MAX_ELEMENTS", "IndexRefusal", "Values", "filled_meta"]

#: the most elements a followed tensor may have (8 MiB of int64)
MAX_ELEMENTS = 1 << 20

_ATTRIBUTE = "_lightning_meta_value"
# marks a value that is (or is computed from) zeros standing for an input given by shape
_ZEROS = "_lightning_meta_assumed_zeros"
# On a meta input: the rule its values follow, ("fill", value) or ("arange", dim) (see
# filled_meta)
_FILL = "_lightning_meta_fill"
_CPU = torch.device("cpu")


class IndexRefusal(IndexError):
    """A known index is out of the range of what it indexes: the real kernel raises.

    Attributes: ``op`` (``"aten.embedding"``), ``value`` (the first index out
    of range), ``size`` (the size indexed) and ``reason`` (the message).
    """

    def __init__(self, op: str, value: int, size: int, what: str) -> None:
        self.op, self.value, self.size = op, value, size
        self.reason = f"index {value} is out of range for {what} of size {size}"
        super().__init__(f"{op}: {self.reason}")


_Index = tuple[Any, int, str, bool, int | None]


def _indices(func: Any, args: tuple[Any, ...]) -> list[_Index]:
    """Return ``(index tensor, size indexed, what, negatives wrap, ignored value)`` of an index op."""
    aten = torch.ops.aten
    if func is aten.embedding.default:
        return [(args[1], args[0].shape[0], "the rows of the embedding", False, None)]
    if func in (aten.index_select.default, aten.gather.default):
        dim = args[1] % max(args[0].dim(), 1)
        size = args[0].shape[dim] if args[0].dim() else 1
        return [(args[2], size, f"dimension {dim}", False, None)]
    if func is aten.index.Tensor:
        out: list[_Index] = []
        dim = 0
        for index in args[1]:
            if index is not None and index.dtype in (torch.bool, torch.uint8):
                dim += max(index.dim(), 1)
                continue
            if index is not None and dim < args[0].dim():
                out.append((index, args[0].shape[dim], f"dimension {dim}", True, None))
            dim += 1
        return out
    if func in (aten.nll_loss_forward.default, aten.nll_loss2d_forward.default):
        classes = args[0].shape[1] if args[0].dim() >= 2 else args[0].shape[0]
        ignore = args[4] if len(args) > 4 else -100
        return [(args[1], classes, "the classes", False, ignore)]
    return []


def _zero_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> frozenset[str]:
    """The names of the inputs given by shape whose zeros the arguments' values come from."""
    found: frozenset[str] = frozenset()
    for t in _tensors(args, kwargs):
        found |= getattr(t, _ZEROS, frozenset())
    return found


def _small(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and math.prod(t.shape) <= MAX_ELEMENTS


def filled_meta(shape: list[int], like: torch.Tensor, dim: int) -> torch.Tensor:
    """A meta tensor of ``shape`` and ``like``'s dtype standing for ``like``'s values, with
    ``like`` resized along ``dim``: where every element of the real ``like`` is one value
    (an all-ones ``attention_mask``), or where it counts 0, 1, 2, ... along ``dim`` (integer
    ``position_ids``), the estimate reads the same rule's values from the result (else
    zeros, listed in ``Estimate.inputs_read_as_zeros``: zeros for positions read as packed
    sequences by transformers). ``find_fit`` resizes its inputs this way."""
    made = torch.empty(shape, dtype=like.dtype, device="meta")
    if like.is_meta or like.layout is not torch.strided or like.numel() == 0:
        return made
    flat = like.detach().reshape(-1)
    if torch.equal(flat, flat[:1].expand_as(flat)):
        setattr(made, _FILL, ("fill", flat[0].item()))
    elif not like.is_floating_point() and not like.is_complex() and like.dtype != torch.bool:
        counting = ("arange", dim)
        if torch.equal(like.detach().cpu(), _filled(counting, like.shape, like.dtype)):
            setattr(made, _FILL, counting)
    return made


def _filled(rule: tuple[str, Any], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The values of a :func:`filled_meta` tensor of ``shape``."""
    kind, arg = rule
    if kind == "fill":
        return torch.full(shape, arg, dtype=dtype, device=_CPU)
    view = [1] * len(shape)
    view[arg] = shape[arg]
    return torch.arange(shape[arg], dtype=dtype, device=_CPU).view(view).expand(shape).clone()


class Values:
    """The real values of the small tensors a fake step computes from inputs and constants.

    :class:`~lightning_meta._estimate._track.LiveBytes` shows it every
    operator (:meth:`read` before running it, :meth:`follow` after), which
    saves a dispatch-mode layer.

    Example::

        >>> import torch
        >>> from lightning_meta._compat import FakeTensorMode
        >>> mode, values = FakeTensorMode(), Values()
        >>> with mode:
        ...     ids = torch.empty(2, 3, dtype=torch.int64)
        >>> values.give(ids, torch.tensor([[5, 0, 7], [1, 2, 3]]))
        >>> values.of(ids)[0, 2].item()
        7
    """

    def __init__(self) -> None:
        # storages written with values nobody knows: their shadows are stale
        self._stale: set[int] = set()
        #: reads answered from zeros standing for an input given by shape:
        #: ``"<operator> in <module>, reading <inputs>"``, each once, in order
        self.zero_reads: list[str] = []
        #: where the step is, for :attr:`zero_reads` (the caller sets it)
        self.where: Callable[[], str] = lambda: "the model"

    def give(self, fake: torch.Tensor, real: torch.Tensor | None, name: str = "an input") -> None:
        """Make ``real`` (or zeros for ``None``) the value of fake tensor ``fake``, if small.

        ``name`` names the input in :attr:`zero_reads` (``mask``, ``batch['labels']``) where
        its value is zeros standing for an input given by shape.
        """
        if not isinstance(fake, FakeTensor) or not _small(fake):
            return
        fill = getattr(real, _FILL, None) if real is not None else None
        if fill is not None:
            value = _filled(fill, fake.shape, fake.dtype)
        elif real is None or real.is_meta:
            value = torch.zeros(fake.shape, dtype=fake.dtype, device=_CPU)
        else:
            value = real.detach().to(device=_CPU, dtype=fake.dtype, copy=True)
        if value.shape == fake.shape:
            setattr(fake, _ATTRIBUTE, value)
            if fill is None and (real is None or real.is_meta):
                setattr(fake, _ZEROS, frozenset((name,)))

    def of(self, t: Any) -> torch.Tensor | None:
        """Return the value of tensor ``t`` on the CPU, or ``None`` if it is not known."""
        if not isinstance(t, torch.Tensor):
            return None
        if isinstance(t, FakeTensor):
            value: torch.Tensor | None = getattr(t, _ATTRIBUTE, None)
            if value is None or (
                self._stale and _compat.storage_id(t.untyped_storage()) in self._stale
            ):
                return None
            return value
        if t.is_meta or t.device.type != "cpu" or not _small(t):
            return None
        return t  # a real constant the model holds or made outside the step

    def read(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> tuple[bool, Any]:
        """Answer a value read (``.item()`` and all that reach it) from a known value.

        Returns:
            ``(True, the Python scalar)`` if ``func`` reads the value of a
            tensor whose value is known, else ``(False, None)``.
        """
        if func not in _compat.value_read_ops() or not args:
            return False, None
        kwargs = kwargs or {}  # torch.allclose(x, y, rtol=...)
        if any(self.of(t) is None for t in _tensors(args, kwargs)):
            return False, None
        self._note_zeros(func, args, kwargs)
        real = self._run(func, args, kwargs)
        return real is not None, real

    def check_indices(self, func: Any, args: tuple[Any, ...]) -> None:
        """Raise :class:`IndexRefusal` if a known index of ``func`` is out of range, as torch does."""
        if func not in _INDEX_OPS:
            return
        for index, size, what, wraps, ignored in _indices(func, args):
            value = self.of(index)
            if value is None or value.is_floating_point() or value.numel() == 0:
                continue
            low = -size if wraps else 0
            with no_dispatch_modes():
                bad = (value < low) | (value >= size)
                if ignored is not None:
                    bad &= value != ignored
                first = int(value[bad].flatten()[0]) if bool(bad.any()) else None
            if first is not None:
                self._note_zeros(func, (index,), {})
                name = str(getattr(func, "overloadpacket", func))
                raise IndexRefusal(name, first, int(size), what)

    def follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Give the outputs of ``func`` their values, when every tensor argument has one.

        Arguments the operator writes to lose their values (their whole
        storage does) when the operator cannot be followed.
        """
        tags = getattr(func, "tags", None)
        if tags is None:  # not an ATen overload: nothing to follow
            return
        known = all(self.of(t) is not None for t in _tensors(args, kwargs))
        writes = _compat.op_schema(func)[0]
        if not known or torch.Tag.nondeterministic_seeded in tags:
            if writes:
                self._forget(_written(func, args, kwargs))
            return
        written = _written(func, args, kwargs) if writes else []
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not all(_small(t) for t in outputs) or any(
            not isinstance(t, FakeTensor) for t in written
        ):
            self._forget(written)
            return
        real = self._run(func, args, kwargs)
        results = [t for t in tree_leaves(real) if isinstance(t, torch.Tensor)]
        if real is None or len(results) != len(outputs):
            self._forget(written)
            return
        zeros = _zero_inputs(args, kwargs)
        for fake, value in zip(outputs, results, strict=True):
            if value.shape == fake.shape and value.dtype == fake.dtype:
                setattr(fake, _ATTRIBUTE, value)
                if zeros:
                    setattr(fake, _ZEROS, zeros)
            else:
                self._forget([fake])

    def shape_of(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Return the real result of an operator whose output shape depends on values, or ``None``."""
        if any(self.of(t) is None for t in _tensors(args, kwargs)):
            return None
        self._note_zeros(func, args, kwargs)
        return self._run(func, args, kwargs)

    def masks_as_indices(self, func: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Return ``args`` of an indexing call with its boolean masks as integer indices, or ``None``.

        ``activation[mask]`` (a masked-LM loss's ``logits[labels != -100]``)
        has an output shape that depends only on the mask's values: where they
        are known, each mask becomes the integer indices of its true elements
        (as the real kernel expands it) and the fake kernel knows the shape. The
        indexed tensor's values are not needed. ``None`` if ``func`` is no
        indexing call or a mask's values are not known.
        """
        if func not in _MASKED_INDEX_OPS or len(args) < 2:
            return None
        indices: list[Any] = []
        for index in args[1]:
            if index is None or index.dtype not in (torch.bool, torch.uint8):
                indices.append(index)
                continue
            value = self.of(index)
            if value is None or value.dim() == 0:
                return None
            self._note_zeros(func, (index,), {})
            with no_dispatch_modes():
                columns = value.nonzero().unbind(1)
            # made by the modes below (fake, on the indexed tensor's device)
            indices += [
                torch.empty(c.shape, dtype=torch.int64, device=args[0].device) for c in columns
            ]
        return (args[0], indices, *args[2:])

    def _note_zeros(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record a read of a value that stands for an input given by shape (zeros)."""
        zeros = _zero_inputs(args, kwargs)
        if zeros:
            # which input: a model reading several (a mask and labels) branches on each
            note = (
                f"{str(func).removesuffix('.default')} in {self.where()}, "
                f"reading {', '.join(sorted(zeros))}"
            )
            if note not in self.zero_reads:
                self.zero_reads.append(note)

    def _run(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``func`` on the values, on the CPU, outside every mode; ``None`` if it fails."""

        def real(leaf: Any) -> Any:
            if isinstance(leaf, torch.Tensor):
                return self.of(leaf)
            if isinstance(leaf, torch.device):
                return _CPU
            return leaf

        new_args, new_kwargs = tree_map(real, (args, kwargs))
        try:
            with no_dispatch_modes(), torch.no_grad(), torch.autocast("cpu", enabled=False):
                return func(*new_args, **new_kwargs)
        except Exception:  # a kernel only the target device has, say: value unknown
            return None

    def _forget(self, written: list[torch.Tensor]) -> None:
        for t in written:
            if isinstance(t, FakeTensor) and getattr(t, _ATTRIBUTE, None) is not None:
                self._stale.add(_compat.storage_id(t.untyped_storage()))


_INDEX_OPS = frozenset(
    {
        torch.ops.aten.embedding.default,
        torch.ops.aten.index_select.default,
        torch.ops.aten.gather.default,
        torch.ops.aten.index.Tensor,
        torch.ops.aten.nll_loss_forward.default,
        torch.ops.aten.nll_loss2d_forward.default,
    }
)


# indexing with boolean masks: the output's shape (or the scatter's) depends on
# the masks' values only
_MASKED_INDEX_OPS = _compat.masked_index_ops()


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """Yield the tensor arguments of an ATen call (tensors and lists of tensors), fast."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    yield item


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Return the tensors ``func`` writes to (in-place and ``out=`` arguments, and a batch
    norm's running statistics in training)."""
    out: list[torch.Tensor] = []
    for index, name in _compat.call_writes(func, args, kwargs):
        value = args[index] if index < len(args) else kwargs.get(name)
        out += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return out
