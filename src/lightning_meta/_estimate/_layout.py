"""Where one rank's share of a model lies under a strategy: blocks, tensor-parallel shapes, shards.

Pure shape arithmetic on the model's parameters, done once per estimate:

* :func:`find_blocks`: the blocks FSDP2 wraps and activation checkpointing
  checkpoints one by one (a transformer's layers);
* :func:`tensor_parallel_plan`: which ``nn.Linear`` / ``nn.Embedding`` are
  split column- or row-wise (the given plan, else the model's transformers
  ``tp_plan``), checked against the model's sizes and
  head counts;
* :func:`layout_of`: each parameter's shape on one rank after tensor
  parallelism, and the FSDP2 units (each block, then the root).

FSDP2 shards every parameter on dim 0 over the data-parallel ranks, padded to
``ceil(dim0 / ranks)`` rows on every rank, so each rank allocates the same
bytes; rank 0 holds only real rows, and the estimate is rank 0's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from torch import nn

from lightning_meta._arguments import spelled
from lightning_meta._errors import ArgumentValueError
from lightning_meta._estimate._parallel import Parallel

__all__ = ["Layout", "Unit", "find_blocks", "layout_of", "shard_rows", "tensor_parallel_plan"]


def shard_rows(rows: int, ranks: int) -> int:
    """Return the rows of dim 0 every rank allocates under FSDP2 (padded): ``ceil(rows / ranks)``."""
    return -(-rows // ranks) if rows else 0


@dataclass
class Unit:
    """One FSDP2 unit: a module given to ``fully_shard`` and the parameter names it owns."""

    name: str
    module: nn.Module
    params: list[str] = field(default_factory=list)


@dataclass
class Layout:
    """One rank's view of the model under a strategy."""

    parallel: Parallel
    #: parameter and buffer name -> its shape on one rank after tensor parallelism
    local_shapes: dict[str, tuple[int, ...]]
    #: module name -> tensor-parallel kind (``colwise``, ``rowwise``, ``colwise_gather``)
    tp_modules: dict[str, str]
    #: dotted names of the blocks, in model order
    blocks: list[str]
    #: how the blocks were found, for messages and the result
    blocks_source: str
    #: FSDP2 units, blocks first, the root last (empty for DDP)
    units: list[Unit]

    def held_numel(self, name: str) -> int:
        """Return the elements of parameter ``name`` one rank allocates (FSDP2: its padded shard)."""
        shape = self.local_shapes[name]
        if self.parallel.strategy != "fsdp" or not shape:
            return math.prod(shape)
        return shard_rows(shape[0], self.parallel.data_parallel) * math.prod(shape[1:])


def _container_blocks(module: nn.Module, name: str) -> list[str]:
    try:
        container = module.get_submodule(name)
    except AttributeError as e:
        raise ArgumentValueError(
            f"estimate: {spelled(f'blocks={name!r}', f'--blocks {name}')} is not a submodule "
            f"of {type(module).__name__}. Fix: pass the dotted name of the container of blocks, "
            f"such as {spelled(repr('model.layers'), 'model.layers')}."
        ) from e
    prefix = f"{name}." if name else ""
    return [prefix + child for child, _ in container.named_children()]


def find_blocks(
    module: nn.Module, blocks: str | tuple[type[nn.Module], ...] | None
) -> tuple[list[str], str]:
    """Return the dotted names of the blocks, and how they were found.

    Args:
        module: the model.
        blocks: a container's dotted name (its children are the blocks),
            module classes (every outermost module of those classes), or
            ``None``: the children of the longest ``ModuleList`` /
            ``Sequential`` whose children are all of one class.

    Returns:
        The block names in model order (possibly none), and a description.

    Raises:
        ArgumentValueError: if a named container does not exist.
    """
    if isinstance(blocks, str):
        names = _container_blocks(module, blocks)
        return names, f"the children of {blocks!r}"
    if blocks is not None:
        found: list[str] = []
        for name, mod in module.named_modules():
            if (
                name
                and isinstance(mod, blocks)
                and not any(name.startswith(f + ".") for f in found)
            ):
                found.append(name)
        classes = ", ".join(c.__name__ for c in blocks)
        return found, f"the {classes} modules"
    best: tuple[int, str] | None = None
    for name, mod in module.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        kinds = {type(child) for child in mod.children()}
        count = len(list(mod.children()))
        if len(kinds) == 1 and count >= 2 and (best is None or count > best[0]):
            best = (count, name)
    if best is None:
        return [], "no blocks (no ModuleList or Sequential of modules of one class)"
    names = _container_blocks(module, best[1])
    return names, f"the children of {best[1] or 'the root'!r}"


def _pattern(key: str) -> re.Pattern[str]:
    return re.compile(
        r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in key.split("."))
    )


def _hf_plan(module: nn.Module) -> tuple[dict[str, str], str]:
    """transformers' plan for the model: what ``from_pretrained(tp_plan="auto")`` applies.

    That is the model's ``tp_plan``: ``PreTrainedModel.post_init`` builds it
    from ``config.base_model_tp_plan`` (for the base model) and the
    ``_tp_plan`` of each child, prefixed with the child's name, so it holds
    exactly what the installed transformers splits (entries that name no
    module, which transformers 4.x also lists, are left out as transformers
    leaves them; in transformers 5.3 a
    ``LlamaForCausalLM`` class's own ``_tp_plan``, the head, is not in it:
    the head stays replicated). A model without that attribute (another
    version, a custom class) gets ``config.base_model_tp_plan`` under its
    ``base_model_prefix``.
    """
    from lightning_meta._estimate._parallel import TP_STYLES

    built = getattr(module, "tp_plan", None) if hasattr(type(module), "_tp_plan") else None
    if isinstance(built, dict):
        # transformers 4.x also lists the base model's keys unprefixed, which
        # name no module of the top model; like transformers, apply what matches.
        names = [n for n, _ in module.named_modules() if n]
        plan = {k: v for k, v in built.items() if any(_pattern(k).fullmatch(n) for n in names)}
        source = "model's tp_plan (transformers)"
    else:
        config = getattr(module, "config", None)
        base: dict[str, str] = dict(getattr(config, "base_model_tp_plan", None) or {})
        prefix = getattr(module, "base_model_prefix", "") or ""
        inner = prefix and isinstance(getattr(module, prefix, None), nn.Module)
        plan = {(f"{prefix}.{k}" if inner else k): v for k, v in base.items()}
        source = "config.base_model_tp_plan"
    if not plan:
        return {}, ""
    unknown = {v for v in plan.values() if v.lower() not in TP_STYLES}
    if unknown:
        raise ArgumentValueError(
            f"estimate: the {source} uses the styles {', '.join(sorted(unknown))}, which "
            f"estimate does not simulate. Fix: pass tensor_parallel_plan= with styles among "
            f"{', '.join(TP_STYLES)}."
        )
    return {k: TP_STYLES[v.lower()] for k, v in plan.items()}, source


def tensor_parallel_plan(module: nn.Module, parallel: Parallel) -> dict[str, str]:
    """Return module name -> tensor-parallel kind for every module the plan splits.

    Raises:
        ArgumentValueError: if there is no plan, a pattern matches no module,
            a matched module is neither ``nn.Linear`` nor ``nn.Embedding``, or
            the tensor-parallel size does not divide its split dimension or
            the model's head counts.
    """
    if parallel.tensor_parallel == 1:
        return {}
    plan, source = (
        (parallel.plan, "tensor_parallel_plan") if parallel.plan is not None else _hf_plan(module)
    )
    if not plan:
        raise ArgumentValueError(
            f"estimate: tensor_parallel={parallel.tensor_parallel} needs a plan saying which "
            f"layers of {type(module).__name__} are split, and it has no transformers "
            "tp_plan or config.base_model_tp_plan. Fix: pass tensor_parallel_plan={'layers.*.attn.q': "
            "'colwise', 'layers.*.attn.out': 'rowwise', ...}, the plan given to torch's "
            "parallelize_module."
        )
    names = [n for n, _ in module.named_modules() if n]
    out: dict[str, str] = {}
    for key, kind in plan.items():
        pattern = _pattern(key)
        matched = [n for n in names if pattern.fullmatch(n)]
        if not matched and not names:
            raise ArgumentValueError(
                f"estimate: the {source} entry {key!r} matches no module of "
                f"{type(module).__name__}, which has no submodules to split. Fix: leave "
                "tensor_parallel and tensor_parallel_plan out, or split a model whose layers "
                "are submodules.",
                paths=[key],
            )
        if not matched:
            raise ArgumentValueError(
                f"estimate: the {source} entry {key!r} matches no module of "
                f"{type(module).__name__}. Fix: use dotted module names from named_modules() "
                f"(such as {names[min(3, len(names) - 1)]!r}), '*' for one level.",
                paths=[key],
            )
        for name in matched:
            if kind != "replicate":
                out[name] = kind
    _check_heads(module, parallel.tensor_parallel)
    return out


def _check_heads(module: nn.Module, tp: int) -> None:
    """Refuse a tensor-parallel size that does not divide the model's attention heads."""
    config = getattr(module, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads", "n_head", "n_query_groups"):
        heads = getattr(config, key, None)
        if isinstance(heads, int) and heads > 0 and heads % tp:
            raise ArgumentValueError(
                f"estimate: tensor_parallel={tp} does not divide config.{key}={heads} of "
                f"{type(module).__name__}: every rank must hold whole heads. Fix: pass a "
                f"tensor_parallel that divides {heads} "
                f"({', '.join(str(d) for d in range(1, heads + 1) if heads % d == 0)})."
            )


def _split(name: str, mod: nn.Module, kind: str, tp: int) -> dict[str, tuple[int, ...]]:
    """Return the local shapes of the parameters of one split module."""
    # the weight's dim each split shards: a Linear's weight is (out, in), an Embedding's (rows, dim)
    if isinstance(mod, nn.Linear):
        dims = {"colwise": 0, "colwise_gather": 0, "rowwise": 1}
    elif isinstance(mod, nn.Embedding):
        dims = {"colwise": 1, "colwise_gather": 1, "rowwise": 0}
    else:
        raise ArgumentValueError(
            f"estimate: the tensor-parallel plan splits {name!r}, a {type(mod).__name__}; "
            "estimate simulates splitting nn.Linear and nn.Embedding only. Fix: leave it out "
            "of tensor_parallel_plan (it is then replicated).",
            paths=[name],
        )
    dim = dims[kind]
    shape = tuple(mod.weight.shape)
    if shape[dim] % tp:
        raise ArgumentValueError(
            f"estimate: tensor_parallel={tp} does not divide dim {dim} ({shape[dim]}) of "
            f"{name}.weight {list(shape)}, which the {kind} split shards. Fix: pass a "
            f"tensor_parallel dividing {shape[dim]}, or leave {name!r} out of the plan.",
            paths=[f"{name}.weight"],
        )
    local = list(shape)
    local[dim] //= tp
    shapes = {f"{name}.weight": tuple(local)}
    bias = getattr(mod, "bias", None)
    if isinstance(mod, nn.Linear) and bias is not None:
        shapes[f"{name}.bias"] = (bias.shape[0] // tp,) if kind != "rowwise" else tuple(bias.shape)
    return shapes


def layout_of(module: nn.Module, parallel: Parallel) -> Layout:
    """Return one rank's layout of ``module`` under ``parallel``.

    Raises:
        ArgumentValueError: if the blocks, the plan or the sizes do not fit
            the strategy (see :func:`find_blocks`, :func:`tensor_parallel_plan`),
            or activation checkpointing finds no blocks.
    """
    blocks, source = find_blocks(module, parallel.blocks)
    if parallel.activation_checkpointing and not blocks:
        raise ArgumentValueError(
            f"estimate: activation_checkpointing found no blocks to checkpoint in "
            f"{type(module).__name__} ({source}). Fix: pass blocks='name.of.container' or "
            "blocks=BlockClass."
        )
    tp_modules = tensor_parallel_plan(module, parallel)
    local: dict[str, tuple[int, ...]] = {}
    for named in (module.named_parameters, module.named_buffers):
        for name, t in named(remove_duplicate=False):
            local[name] = tuple(t.shape)
    ids: dict[int, list[str]] = {}
    for name, t in module.named_parameters(remove_duplicate=False):
        ids.setdefault(id(t), []).append(name)
    modules = dict(module.named_modules())
    for name, kind in tp_modules.items():
        for pname, shape in _split(name, modules[name], kind, parallel.tensor_parallel).items():
            tensor = module.get_parameter(pname)
            for alias in ids[id(tensor)]:
                if local[alias] != tuple(tensor.shape) and local[alias] != shape:
                    raise ArgumentValueError(
                        f"estimate: {alias!r} is shared with {pname!r} and the plan splits them "
                        "differently. Fix: split tied weights the same way, or leave one "
                        "replicated.",
                        paths=[alias, pname],
                    )
                local[alias] = shape
    if parallel.strategy == "ddp" and not any(p.requires_grad for p in module.parameters()):
        raise ArgumentValueError(
            f"estimate: {type(module).__name__} has no parameter that requires a gradient, "
            'which DistributedDataParallel refuses to wrap ("DistributedDataParallel is not '
            "needed when a module doesn't have any parameter that requires a gradient\"). "
            "Fix: estimate without a strategy (each rank would hold the whole model: the "
            "one-process figure is a rank's), or leave some parameters trainable."
        )
    units: list[Unit] = []
    if parallel.strategy == "fsdp":
        scalars = [n for n, p in module.named_parameters() if p.dim() == 0]
        if scalars:
            # fully_shard raises for them at setup: a rank estimate would be of a run
            # that cannot start (CLIP's logit_scale is one).
            raise ArgumentValueError(
                f"estimate: {scalars} {'is a' if len(scalars) == 1 else 'are'} 0-dim "
                f"parameter{'' if len(scalars) == 1 else 's'}, which fully_shard refuses "
                '("fully_shard doesn\'t support scalar parameters"). Fix: make '
                f"{'it' if len(scalars) == 1 else 'each'} a 1-D tensor of one element "
                "(nn.Parameter(torch.tensor([value]))), as torch says, or estimate with "
                "strategy='ddp'.",
                paths=scalars,
            )
        owner: dict[int, Unit] = {}
        units = [Unit(b, module.get_submodule(b)) for b in blocks] + [Unit("", module)]
        for unit in units:  # a parameter belongs to the innermost unit that holds it: blocks first
            for pname, t in unit.module.named_parameters():
                if id(t) not in owner:
                    owner[id(t)] = unit
                    unit.params.append(f"{unit.name}.{pname}" if unit.name else pname)
    return Layout(parallel, local, tp_modules, blocks, source, units)
