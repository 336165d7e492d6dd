"""The Lightning callback: materialize deferred models at the right moment, refuse stray meta tensors.

This is the only module of the package that imports Lightning's trainer
machinery. The materialization itself lives in ``_guard_materialize``.

When it acts, in ``Trainer._run`` order:

1. ``Callback.setup``: notes which deferred tensors exist before
   ``configure_model`` and wraps four methods of this run's *strategy
   instance* (never the class): ``model_sharded_context`` (to note the
   deferred tensors built under Lightning's device context in
   ``configure_model``), ``setup``, ``load_model_state_dict`` and
   ``teardown``. Lightning offers no callback hook between ``configure_model``
   and the strategy's device transfer, so this is the one place to act.
2. Right before the strategy's ``setup`` (or before a ``ckpt_path`` restore
   that comes earlier): refuses meta tensors other callbacks hold (copies of
   the weights taken in their ``setup``), and meta parameters and buffers
   that were never deferred, naming each path, then materializes the deferred ones on the
   root device (shard by shard after ``fully_shard``); for ``strategy="fsdp"``
   hands torch's FSDP a ``param_init_fn`` that replays each unit as it is
   wrapped. Lightning's own ``to_empty()`` + ``reset_parameters()`` then finds
   nothing left to do. Deferred modules held by other callbacks and by the
   ``LightningDataModule`` are materialized on the CPU, where eager
   construction leaves them; meta tensors ``save_hyperparameters`` kept are
   refused.
3. ``on_fit_start``: refuses meta tensors in the optimizers. ``on_train_start``
   (and the validation, test and predict starts): materializes on the CPU the
   deferred modules the datasets of the stage's dataloaders hold.
4. ``on_save_checkpoint``: refuses meta tensors in the checkpoint (they would
   also make ``load_from_checkpoint`` move the model to meta).
5. The strategy's ``teardown`` and the ``teardown`` / ``on_exception`` hooks
   put every wrapped method back, whether the run succeeded or not. A
   ``WeightAveraging`` listed before ``MetaGuard`` fails in its own ``setup``,
   before ``MetaGuard``'s: ``on_exception`` then has the strategy's
   ``teardown`` raise a ``MetaTensorError`` naming the fix, once Lightning's
   clean-up has run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import Dataset

from lightning_meta import _compat
from lightning_meta._arguments import check_flag
from lightning_meta._deferred._handles import deferred_slots, deferred_tensors
from lightning_meta._deferred._materialize import materialize
from lightning_meta._deferred._reach import MAX_DEPTH, MAX_ITEMS, held_modules
from lightning_meta._errors import MetaTensorError
from lightning_meta._guard._find import (
    MetaFinding,
    count_meta,
    explain,
    find_meta_tensors,
    find_meta_tensors_beside,
    first_paths,
)
from lightning_meta._guard._materialize import (
    HYPERPARAMETERS,
    deepspeed_refusal,
    fsdp_param_init_fn,
    materialize_model,
    refuse_hyperparameters,
    refuse_left,
    refuse_strays,
)

__all__ = ["MetaGuard"]

logger = logging.getLogger(__name__)

# The strategy instance's methods a run wraps (and restores when it ends).
_PATCHED = ("model_sharded_context", "setup", "load_model_state_dict", "teardown")
# Wrappers whose run ended while another wrapper sat on top of them, by id: (the
# wrapper, whether the instance had the attribute before, what it held). Held
# only until the wrapper on top is undone.
_RESTORED: dict[int, tuple[Any, bool, Any]] = {}


class MetaGuard(Callback):
    """Make deferred and meta-device models safe in any Lightning ``Trainer``.

    Add it to the trainer's callbacks; nothing else changes. A model built
    under :func:`~lightning_meta.deferred_init` (in ``__init__`` or in
    ``configure_model``) is materialized exactly, with the values eager
    construction with the same seed gives:

    - single device, ``ddp``, ``ddp_spawn``: on the root device, right before
      Lightning moves and wraps the model;
    - ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``):
      after sharding, one tensor at a time, each rank keeping only its shard;
    - ``strategy="fsdp"`` (FSDP1): unit by unit as torch's FSDP wraps it,
      through its ``param_init_fn``;
    - ``DeepSpeedStrategy``: refused when the run starts, before anything is
      allocated, with a :class:`~lightning_meta.MetaTensorError` naming what
      to use instead.

    Real weights are never re-initialised and
    :class:`~lightning_meta.MetaTemplate`\\ s are never materialized. A meta
    parameter or buffer that was not deferred, or a meta tensor in an
    optimizer or a checkpoint, raises :class:`~lightning_meta.MetaTensorError`
    naming every path and the fix before Lightning would fail on it.

    Args:
        allow_uninitialized: as in :func:`~lightning_meta.materialize`:
            deferred tensors the model leaves uninitialised (``torch.empty``
            never filled, such as a non-persistent cache buffer) get
            uninitialised memory, as in eager construction, instead of a
            :class:`~lightning_meta.MaterializationError` before the run.

    Example::

        >>> import lightning as L, torch, lightning_meta as lm
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         with lm.deferred_init():
        ...             self.layer = torch.nn.Linear(4, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         return self.layer(batch[0]).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)))
        >>> model = Net()
        >>> trainer = L.Trainer(max_steps=2, callbacks=[lm.MetaGuard()], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False, accelerator="cpu")
        >>> trainer.fit(model, data)
        >>> model.layer.weight.is_meta
        False

    A deferred module held by another callback or by the
    ``LightningDataModule`` (``trainer.datamodule``; a frozen feature
    extractor used in ``on_after_batch_transfer``) is materialized on the CPU,
    where eager construction leaves it (Lightning moves neither).

    .. warning::
        Lightning gives callbacks no hook between ``configure_model`` and the
        strategy's setup, so ``MetaGuard`` wraps ``model_sharded_context``,
        ``setup``, ``load_model_state_dict`` and ``teardown`` on the trainer's
        strategy *instance* for the length of a run, and restores them when it
        ends, also on failure. List it before a ``WeightAveraging`` callback:
        Lightning runs callbacks' ``setup`` in list order, and
        ``WeightAveraging`` moves a copy of the model in its own. Under FSDP1, modules wrapped in ``FullyShardedDataParallel``
        inside ``configure_model`` are materialized by torch before MetaGuard
        can act; let the strategy wrap them (``auto_wrap_policy``) instead.
    """

    def __init__(self, *, allow_uninitialized: bool = False) -> None:
        check_flag(allow_uninitialized, "allow_uninitialized", "MetaGuard")
        self.allow_uninitialized = allow_uninitialized
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._before: frozenset[int] = frozenset()
        # Whether Lightning entered model_sharded_context (configure_model is
        # overridden) in this run: only then is anything built on the device.
        self._sharded = False
        self._prepared = False
        self._running = False
        self._refusal: tuple[MetaTensorError, BaseException] | None = None
        # the meta tensors later callbacks held when this setup ran (their own), by id
        self._own_meta: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the trainer before any run starts; nothing of a
        # run (bound methods of a strategy) may travel with it.
        return {
            "allow_uninitialized": self.allow_uninitialized,
            "_undo": [],
            "_before": frozenset(),
            "_sharded": False,
            "_prepared": False,
            "_running": False,
            "_refusal": None,
            "_own_meta": {},
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- hooks -------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()  # a run that ended without reaching teardown
        guards = [cb for cb in trainer.callbacks if isinstance(cb, MetaGuard)]  # type: ignore[attr-defined]
        if len(guards) > 1:
            # Each would wrap the strategy's methods around the other's, and
            # materialize and refuse twice: one does all of it.
            raise MetaTensorError(
                f"Trainer(callbacks=...) holds {len(guards)} MetaGuard callbacks; one guards the "
                "whole run. Fix: keep a single lightning_meta.MetaGuard() in the callbacks (check "
                "what adds one: a callbacks list built in two places, configure_callbacks)."
            )
        self._running = True
        self._refusal = None
        self._own_meta = self._callback_meta(trainer, pl_module)
        _refuse_deepspeed(trainer.strategy, type(pl_module).__name__)
        self._prepared = False
        self._sharded = False
        self._before = frozenset(_deferred_ids(pl_module))
        strategy = trainer.strategy
        # Entered right around configure_model, and only when the module
        # overrides it (after LightningModule.setup, whose modules are built on
        # the CPU): what is deferred from then on was built under Lightning's
        # device context.
        self._wrap(strategy, "model_sharded_context", lambda: self._note_before(pl_module))
        self._wrap(
            strategy,
            "setup",
            lambda: self._prepare(trainer),
        )
        self._wrap_load(strategy, trainer)
        self._wrap_teardown(strategy)
        if stage == "fit" and _averages_in_setup(trainer, self):
            if is_overridden("configure_model", pl_module):
                # WeightAveraging.setup calls configure_model itself (on the CPU,
                # outside Lightning's device context) and copies the result:
                # build it here, as it would, so there is a model to materialize.
                pl_module.configure_model()
                self._before = frozenset(_deferred_ids(pl_module))
            if self._before:
                self._materialize_for_averaging(trainer, pl_module)

    def _materialize_for_averaging(self, trainer: pl.Trainer, module: nn.Module) -> None:
        """Materialize the model now, on the CPU, for a ``WeightAveraging`` callback after this one.

        It copies the model and moves the copy inside its own ``setup``, before
        Lightning moves the model: in eager construction a real model on the
        CPU, which this gives (Lightning moves it later, as in eager).
        """
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise MetaTensorError(
                f"MetaGuard cannot materialize {type(module).__name__} for WeightAveraging under "
                f"{type(trainer.strategy).__name__}: WeightAveraging copies the whole model in "
                "its setup, before the strategy shards it. Fix: drop WeightAveraging, or "
                "call lm.materialize(model) before trainer.fit."
            )
        materialize_model(module, torch.device("cpu"), allow_uninitialized=self.allow_uninitialized)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problems = [
            dataclasses.replace(f, path=f"optimizers.{f.path}")
            for f in find_meta_tensors(list(trainer.optimizers))
            if f.problem
        ]
        if problems:
            raise explain(
                problems,
                f"{type(pl_module).__name__}.configure_optimizers()",
                "The optimizer cannot step them.",
            )

    # Lightning sets up a stage's dataloaders just before its start hook.
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._datasets(trainer.train_dataloader, "train_dataloader", pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._datasets(trainer.val_dataloaders, "val_dataloaders", pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._datasets(trainer.test_dataloaders, "test_dataloaders", pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._datasets(trainer.predict_dataloaders, "predict_dataloaders", pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        problems = [f for f in find_meta_tensors(checkpoint) if f.problem]
        if problems:
            raise explain(
                problems,
                "The checkpoint Lightning is about to save",
                "It was not written: meta tensors save without error, and "
                "load_from_checkpoint would then move the whole model to meta.",
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not self._running:
            self._explain_early_failure(trainer, pl_module, exception)
            if self._refusal is None and pl_module is not None and _has_meta(pl_module):
                # Lightning failed before this callback's setup (prepare_data, a
                # datamodule, an earlier callback): keep the strategy's teardown
                # `.cpu()` off the deferred model, so the original error surfaces
                # and not torch's "Cannot copy out of meta tensor" on top of it.
                self._wrap_teardown(trainer.strategy)
        self._running = False
        # The strategy's teardown still runs after this hook; its wrapper keeps
        # Lightning's `.cpu()` off refused meta tensors and then removes itself.
        self._restore(keep="teardown")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._running = False
        self._restore()

    # -- the work ----------------------------------------------------------

    def _explain_early_failure(
        self, trainer: pl.Trainer, module: nn.Module, exception: BaseException
    ) -> None:
        """Refuse the run a ``WeightAveraging`` listed before this callback broke.

        Lightning calls callbacks' ``setup`` in list order, and
        ``WeightAveraging``'s moves a copy of the model to its device: on a
        deferred model, torch's "Cannot copy out of meta tensor" before
        ``MetaGuard`` could act, and again from Lightning's ``teardown``. This
        hook cannot raise without cutting Lightning's clean-up short (the other
        callbacks' ``on_exception``, the loggers), so the strategy's
        ``teardown``, which runs last, raises the ``MetaTensorError`` once it
        has done its work, keeping its ``.cpu()`` off the meta tensors.
        """
        earlier = _averaging_before(trainer, self)
        if earlier is None or not _compat.is_torch_meta_error(exception):
            return
        found = [f for f in find_meta_tensors(module) if f.problem]
        if not found:
            return
        name = type(module).__name__
        error = MetaTensorError(
            f"{earlier} is listed before MetaGuard in Trainer(callbacks=...): Lightning runs "
            f"callbacks' setup in that order, and {earlier}.setup copies {name} and moves the copy "
            f"to its device there, before MetaGuard could materialize the {count_meta(found)} "
            f"({first_paths(found)}), so torch raised {type(exception).__name__}. Fix: list "
            f"MetaGuard before {earlier}: callbacks=[lightning_meta.MetaGuard(), {earlier}(...)] "
            "(MetaGuard then materializes the model on the CPU for it).",
            paths=[f.path for f in found],
        )
        self._refusal = (error, exception)
        self._wrap_teardown(trainer.strategy)

    def _note_before(self, module: nn.Module) -> None:
        self._sharded = True
        self._before = frozenset(_deferred_ids(module))

    def _prepare(self, trainer: pl.Trainer) -> None:
        if self._prepared:
            return
        module = trainer.lightning_module
        strategy = trainer.strategy
        device = strategy.root_device
        name = type(module).__name__
        try:
            self._refuse_callback_copies(trainer, module)
        finally:
            self._own_meta = {}
        if _is_fsdp1(strategy):
            refuse_strays(module, name)
            self._install_param_init_fn(strategy, device)
        else:
            # Without configure_model, Lightning enters no device context: every
            # deferred tensor (built in __init__ or in setup) is drawn on the CPU.
            on_device = (
                frozenset(_deferred_ids(module)) - self._before if self._sharded else frozenset()
            )
            count = materialize_model(
                module,
                device,
                on_device=on_device,
                allow_uninitialized=self.allow_uninitialized,
            )
            if count:
                logger.info(
                    "MetaGuard materialized %d deferred tensors of %s on %s, %d of them "
                    "with the device's generator (built in configure_model)",
                    count,
                    name,
                    device,
                    len(on_device),
                )
        tree = {id(m) for m in module.modules()}
        self._copies(trainer, tree)
        if trainer.datamodule is not None:  # type: ignore[attr-defined]
            self._datamodule(trainer.datamodule, tree, check=not _is_fsdp1(strategy))  # type: ignore[attr-defined]
        for loaders_name, loaders in _given_loaders(trainer):
            self._datasets(loaders, loaders_name, module)
        self._prepared = True
        if not _is_fsdp1(strategy):  # torch's FSDP materializes inside the strategy's setup
            refuse_left(module, name)
            refuse_hyperparameters(module, name)

    def _callback_found(
        self, trainer: pl.Trainer, module: nn.Module
    ) -> list[tuple[Callback, list[tuple[MetaFinding, torch.Tensor | None]]]]:
        """The meta tensors every other callback holds outside ``module``, with the tensors."""
        others = [cb for cb in trainer.callbacks if cb is not self and vars(cb)]  # type: ignore[attr-defined]
        if not others:
            return []
        found = find_meta_tensors_beside(
            module,
            {
                str(i): {
                    # (not a table of data: a deque of a million tensors holds no copy;
                    # a dict of a large model's copies is searched)
                    name: value
                    for name, value in vars(cb).items()
                    if not isinstance(value, _SIZED) or len(value) <= _CALLBACK_ITEMS
                }
                for i, cb in enumerate(others)
            },
        )
        return [(cb, found[str(i)]) for i, cb in enumerate(others)]

    def _callback_meta(self, trainer: pl.Trainer, module: nn.Module) -> dict[int, torch.Tensor]:
        """The meta tensors the callbacks whose ``setup`` has not run yet hold now, by id: made
        in their ``__init__`` (on purpose, as eager runs hold them), not copied in ``setup``.
        Held until the model is prepared, so that no copy made since takes one's id."""
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        later = (
            {id(cb) for cb in callbacks[callbacks.index(self) + 1 :]}
            if self in callbacks
            else set()
        )
        if not later:
            return {}
        return {
            id(t): t
            for cb, found in self._callback_found(trainer, module)
            if id(cb) in later
            for f, t in found
            if t is not None and _copy_like(f)
        }

    def _refuse_callback_copies(self, trainer: pl.Trainer, module: nn.Module) -> None:
        """Refuse plain meta tensors that other callbacks copied from the deferred model.

        Lightning runs every callback's ``setup`` before the strategy's, where
        MetaGuard materializes: a copy of the weights taken there
        (``{k: p.detach().clone()}``, cast or not: an EMA's or L2-SP's
        snapshot; ``torch.ones_like(p)`` masks) is a meta tensor no record
        fills, where eager construction gives a real one; a CPU op reading it
        (``w.sub_(snapshot)``) computes nothing and raises nothing. Such a copy
        is told as a tensor a callback holds outside any module (in an
        attribute, a container or a plain object) with the shape of one of the
        model's deferred tensors, and that it did not hold yet when MetaGuard's
        own ``setup`` ran (a meta input for ``measure_flops`` made in the
        callback's ``__init__`` is its own). A module a callback holds on meta
        on purpose (a teacher it fills later, a model for ``measure_flops``, the
        templates in the copy ``StochasticWeightAveraging`` makes) is left
        alone, as are deferred modules the callbacks deep-copy, which are
        materialized (:meth:`_copies`).
        """
        candidates = [
            (callback, [f for f, t in found if _copy_like(f) and id(t) not in self._own_meta])
            for callback, found in self._callback_found(trainer, module)
        ]
        # (the model's deferred tensors are walked only where a callback holds a candidate)
        shapes = (
            {s.tensor.shape for s in deferred_slots(module)}
            if any(fs for _, fs in candidates)
            else set()
        )
        for callback, fs in candidates:
            held = [
                dataclasses.replace(f, path=f.path.split(".", 1)[1].replace(".<tensor>", ""))
                for f in fs
                if torch.Size(f.shape) in shapes
            ]
            if held:
                owner = type(callback).__name__
                raise MetaTensorError(
                    f"The callback {owner} holds {count_meta(held)} with the shapes of "
                    f"{type(module).__name__}'s deferred tensors ({first_paths(held)}), made from "
                    f"them before MetaGuard materialized the model (in {owner}.setup, which "
                    "Lightning runs before the strategy's setup, or before MetaGuard's own "
                    "setup), which no record fills. Eager construction gives real tensors "
                    "there; a CPU op reading a meta tensor computes nothing and raises nothing. "
                    f"Fix: make them in {owner}.on_fit_start (or later), after MetaGuard has "
                    f"materialized the model; a meta tensor {owner} makes in its __init__ on "
                    f"purpose is its own where MetaGuard is listed before {owner} in "
                    "Trainer(callbacks=...).",
                    paths=[f.path for f in held],
                )

    def _copies(self, trainer: pl.Trainer, tree: set[int]) -> None:
        """Materialize the copies of the model other callbacks made in their ``setup``.

        ``StochasticWeightAveraging`` and ``ModelPruning`` (lottery ticket)
        deep-copy the module there, before Lightning moves it: in eager
        construction a real copy on the CPU; here a deferred copy, which
        ``.to(device)`` later failed on. They get eager's values, on the CPU.
        """
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if callback is not self:
                self._held(vars(callback), tree)

    def _datamodule(self, datamodule: Any, tree: set[int], *, check: bool) -> None:
        """Materialize the deferred modules ``datamodule`` holds, on the CPU, as its callbacks'.

        Lightning moves neither a datamodule nor what it holds: eager
        construction leaves a module built there on the CPU, and a CPU matmul
        with a meta weight returns uninitialised memory instead of raising.
        Then refuse, as ``datamodule.<path>``, what is still deferred or a
        reference taken before materializing (``check``: the model is real by
        now, so such a reference cannot be filled any more).
        """
        attributes = {k: v for k, v in vars(datamodule).items() if k not in HYPERPARAMETERS}
        self._held(attributes, tree)
        if not check:
            return
        left = [
            dataclasses.replace(f, path=f"datamodule.{name}.{f.path}".replace(".<tensor>", ""))
            for name, value in attributes.items()
            # (not a table of data: a list of samples holds no module)
            if not isinstance(value, (list, tuple, dict, set)) or len(value) <= MAX_ITEMS
            for f in find_meta_tensors(value)
            if f.problem and (f.deferred or f.escaped is not None or f.stale)
        ]
        if left:
            raise explain(
                left,
                f"The LightningDataModule {type(datamodule).__name__}",
                "MetaGuard materialized the deferred modules the datamodule holds on the CPU; "
                "these were left without data (held where materialize does not reach, or a "
                "reference taken before materializing), and batches would be computed with them. "
                "Fix: call lightning_meta.materialize(module) on each before the run, or hold "
                "them in attributes, lists, tuples or dicts of the datamodule (which MetaGuard "
                "materializes).",
                left=True,
            )

    def _datasets(self, loaders: Any, name: str, module: nn.Module) -> None:
        """Materialize on the CPU the deferred modules the datasets of ``loaders`` hold.

        Dataloaders passed to ``fit`` (or ``validate``, ``test``, ``predict``)
        without a datamodule: a frozen feature extractor of the model's block
        used in ``Dataset.__getitem__`` gets eager's values where eager
        construction leaves it, on the CPU, as a datamodule's does (before
        2026-12-07, fourth session: torch's "Cannot copy out of meta tensor"
        when the batch moved). Run when the model is prepared, before Lightning
        starts the loaders' workers (:func:`_given_loaders`), and again when a
        stage starts, for loaders a ``*_dataloader()`` hook built since.
        """
        if not deferred_tensors():  # (a dataset's walk is not free: skipped once all is real)
            return
        tree = {id(m) for m in module.modules()}
        for path, loader in _loaders(loaders, name):
            dataset = getattr(loader, "dataset", None)
            if dataset is None:
                continue
            for name_, value in _dataset_attributes(dataset, f"{path}.dataset"):
                for _, held in _modules_in(value, name_):
                    if id(held) not in tree and deferred_slots(held):
                        materialize(held, allow_uninitialized=self.allow_uninitialized)

    def _held(self, attributes: dict[str, Any], tree: set[int]) -> None:
        """Materialize on the CPU the deferred modules outside the model ``attributes`` hold."""
        for name, value in list(attributes.items()):
            for _, held in held_modules(value, name):
                # The model's own modules (a reference to the LightningModule)
                # are materialized where the strategy needs them, not here.
                if id(held) not in tree and deferred_slots(held):
                    materialize(held, allow_uninitialized=self.allow_uninitialized)

    def _install_param_init_fn(self, strategy: Any, device: torch.device) -> None:
        kwargs: dict[str, Any] = strategy.kwargs
        had = "param_init_fn" in kwargs
        user = kwargs.get("param_init_fn")
        ours = fsdp_param_init_fn(device, allow_uninitialized=self.allow_uninitialized)

        def init(module: nn.Module) -> None:
            ours(module)
            # The user's initialiser only for what is still on meta: running it
            # on replayed modules would overwrite the exact values.
            if user is not None and _has_meta(module, recurse=False):
                user(module)

        kwargs["param_init_fn"] = init

        def undo() -> None:
            if had:
                kwargs["param_init_fn"] = user
            else:
                kwargs.pop("param_init_fn", None)

        self._undo.append(("param_init_fn", undo))

    # -- patching the strategy instance ------------------------------------

    def _wrap(self, strategy: Any, name: str, before: Callable[[], None]) -> None:
        original = getattr(strategy, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before()
            return original(*args, **kwargs)

        self._set(strategy, name, wrapper)

    def _wrap_load(self, strategy: Any, trainer: pl.Trainer) -> None:
        """Have a ``ckpt_path`` restore that comes before the strategy's setup fill the
        deferred tensors first, then materialize what the checkpoint left.

        The deferred load hooks fill them exactly without replaying: a model
        built under ``trainer.init_module(empty_init=True)`` cannot be
        replayed at all, and any other would replay its whole initialisation
        only to overwrite it.
        """
        original = strategy.load_model_state_dict

        @functools.wraps(original)
        def load(*args: Any, **kwargs: Any) -> Any:
            if self._prepared:
                return original(*args, **kwargs)
            module = trainer.lightning_module
            # A meta tensor no load fills is refused before anything is copied.
            refuse_strays(module, type(module).__name__)
            result = original(*args, **kwargs)
            self._prepare(trainer)
            return result

        self._set(strategy, "load_model_state_dict", load)

    def _wrap_teardown(self, strategy: Any) -> None:
        original = strategy.teardown

        @functools.wraps(original)
        def teardown(*args: Any, **kwargs: Any) -> Any:
            refusal, self._refusal = self._refusal, None
            module = strategy.lightning_module
            shadowed = module is not None and _has_meta(module)
            if shadowed:
                # The run was refused with meta tensors still in place; move what
                # is real to the CPU and keep Lightning's `.cpu()` from raising
                # NotImplementedError on top of the MetaTensorError. Not past the
                # fake tensors of a failed deferred_init block: Module._apply swaps
                # tensor subclasses even when given the same tensor back, and
                # the swap would raise on them on top of the block's error.
                tensors = [*module.parameters(), *module.buffers()]
                if not any(isinstance(t, _compat.FakeTensor) for t in tensors):
                    _compat.apply_to_tensors(module, lambda t: t if t.is_meta else t.cpu())
                # (not twice: another MetaGuard's teardown may shadow it already)
                shadowed = "cpu" not in vars(module)
                if shadowed:
                    object.__setattr__(module, "cpu", lambda: module)
            try:
                result = original(*args, **kwargs)
            finally:
                if shadowed:
                    object.__delattr__(module, "cpu")
                self._restore()
            if refusal is not None:
                error, cause = refusal
                raise error from cause
            return result

        self._set(strategy, "teardown", teardown)

    def _set(self, obj: Any, name: str, value: Any) -> None:
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)

        def undo() -> None:
            if vars(obj).get(name) is not value:
                # Wrapped by someone else since; theirs stays, and whoever
                # restores past this wrapper (another MetaGuard's teardown,
                # wrapped around this one) skips it to what it replaced.
                _RESTORED[id(value)] = (value, had, old)
                return
            back, restored = had, old
            while id(restored) in _RESTORED and _RESTORED[id(restored)][0] is restored:
                _, back, restored = _RESTORED.pop(id(restored))
            if back:
                setattr(obj, name, restored)
            else:
                delattr(obj, name)

        self._undo.append((name, undo))

    def _restore(self, keep: str | None = None) -> None:
        kept = []
        for name, undo in reversed(self._undo):
            if name == keep:
                kept.append((name, undo))
            else:
                undo()
        self._undo = kept


def _refuse_deepspeed(strategy: Any, name: str) -> None:
    """Refuse DeepSpeed before ``configure_model`` runs and before anything is allocated."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        raise MetaTensorError(
            deepspeed_refusal(
                f"MetaGuard cannot guard {name}",
                "use ModelParallelStrategy (FSDP2, fully_shard in configure_model) or "
                "strategy='fsdp' with MetaGuard, or, for ZeRO stage 1 or 2, drop MetaGuard and "
                "call lightning_meta.materialize(model) before trainer.fit.",
            )
        )


def _averaging_before(trainer: pl.Trainer, guard: MetaGuard) -> str | None:
    """The class name of a ``WeightAveraging`` callback (Lightning >= 2.6) listed before ``guard``."""
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:
        return None
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
    earlier = callbacks[: callbacks.index(guard)] if guard in callbacks else []
    names = [type(cb).__name__ for cb in earlier if isinstance(cb, WeightAveraging)]
    return names[0] if names else None


def _averages_in_setup(trainer: pl.Trainer, guard: MetaGuard) -> bool:
    """Whether a ``WeightAveraging`` callback (Lightning >= 2.6) runs its ``setup`` after ``guard``."""
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:
        return False
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
    later = callbacks[callbacks.index(guard) + 1 :] if guard in callbacks else []
    return any(isinstance(cb, WeightAveraging) for cb in later)


def _is_fsdp1(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


_SIZED = (list, tuple, dict, set, frozenset, collections.deque)
# The most items of a container a callback holds that are searched for copies of the weights.
_CALLBACK_ITEMS = 100_000


def _copy_like(found: MetaFinding) -> bool:
    """Whether a meta tensor a callback holds may be a copy of a deferred one: held outside
    any module (a module's own parameters and buffers are on meta on purpose), not deferred."""
    return found.kind in ("tensor", "attribute") and not found.deferred


def _given_loaders(trainer: pl.Trainer) -> list[tuple[str, Any]]:
    """The dataloaders given to this run's entry point (``fit``'s train and val loaders,
    ``validate``'s, ``test``'s, ``predict``'s), as Lightning's loops hold them from the
    call on, before they start any worker; not a datamodule or a module, whose hooks
    build them later. Reads each loop's ``_data_source.instance`` (private to Lightning,
    where ``_DataConnector.attach_dataloaders`` puts them: Lightning 2.5 and 2.6)."""
    fit = getattr(trainer, "fit_loop", None)
    loops = (
        ("train_dataloaders", fit),
        ("val_dataloaders", getattr(getattr(fit, "epoch_loop", None), "val_loop", None)),
        ("val_dataloaders", getattr(trainer, "validate_loop", None)),
        ("test_dataloaders", getattr(trainer, "test_loop", None)),
        ("predict_dataloaders", getattr(trainer, "predict_loop", None)),
    )
    given = []
    for name, loop in loops:
        instance = getattr(getattr(loop, "_data_source", None), "instance", None)
        if instance is not None and not isinstance(
            instance, (pl.LightningModule, pl.LightningDataModule)
        ):
            given.append((name, instance))
    return given


def _loaders(loaders: Any, path: str, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """The dataloaders of a stage as Lightning takes them (one, a ``CombinedLoader``, or
    lists, tuples and dicts of them), with their paths."""
    if depth > MAX_DEPTH:
        return
    iterables = getattr(loaders, "iterables", None)
    if isinstance(loaders, CombinedLoader) and iterables is not None:
        yield from _loaders(iterables, path, depth + 1)
    elif isinstance(loaders, dict):
        for key, value in loaders.items():
            yield from _loaders(value, f"{path}[{key!r}]", depth + 1)
    elif isinstance(loaders, (list, tuple)):
        for i, value in enumerate(loaders):
            yield from _loaders(value, f"{path}[{i}]", depth + 1)
    elif loaders is not None:
        yield path, loaders


# The most objects searched for modules in one attribute of a dataset (breadth first): a
# dataset's tables of samples (a tokenised corpus, nested feature lists) are not searched through.
_DATASET_VISITS = 10_000


def _modules_in(value: Any, path: str) -> list[tuple[str, nn.Module]]:
    """The modules ``value`` is or holds in lists, tuples and dicts, a few levels down,
    breadth first, looking at most at ``_DATASET_VISITS`` objects."""
    found: list[tuple[str, nn.Module]] = []
    queue: collections.deque[tuple[str, Any, int]] = collections.deque([(path, value, 0)])
    seen: set[int] = set()
    budget = _DATASET_VISITS
    while queue and budget > 0:
        where, item, depth = queue.popleft()
        budget -= 1
        if isinstance(item, nn.Module):
            found.append((where, item))
        elif depth < MAX_DEPTH and isinstance(item, (list, tuple, dict)) and id(item) not in seen:
            seen.add(id(item))
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, inner in itertools.islice(pairs, budget):
                budget -= 1  # every item looked at counts
                if isinstance(inner, (nn.Module, list, tuple, dict)):
                    queue.append((f"{where}.{key}", inner, depth + 1))
    return found


def _dataset_attributes(dataset: Any, path: str, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """The attributes of ``dataset`` and of the datasets it wraps (``Subset``'s ``dataset``,
    ``ConcatDataset``'s ``datasets``), with their paths; a dataset that is a module itself."""
    if isinstance(dataset, nn.Module):
        yield path, dataset
        return
    attributes = getattr(dataset, "__dict__", None)
    if not isinstance(attributes, dict) or depth > MAX_DEPTH:
        return
    for key, value in attributes.items():
        inner = f"{path}.{key}"
        if isinstance(value, Dataset) and not isinstance(value, nn.Module):
            yield from _dataset_attributes(value, inner, depth + 1)
        elif (
            isinstance(value, (list, tuple))
            and 0 < len(value) <= MAX_ITEMS
            and all(isinstance(v, Dataset) for v in value)
        ):
            for i, v in enumerate(value):
                yield from _dataset_attributes(v, f"{inner}[{i}]", depth + 1)
        else:
            yield inner, value


def _deferred_ids(module: nn.Module) -> list[int]:
    """The ids of ``module``'s deferred tensors: parameters, buffers, attributes, container items."""
    return [id(s.tensor) for s in deferred_slots(module)]


def _has_meta(module: nn.Module, recurse: bool = True) -> bool:
    """Whether ``module`` holds a parameter or buffer without data: on meta, or a fake
    tensor a failed ``deferred_init`` block left behind."""
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return any(t.is_meta or isinstance(t, _compat.FakeTensor) for t in tensors)
