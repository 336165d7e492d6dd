"""Private torch APIs are used in ``_compat.py`` and nowhere else in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_meta

PACKAGE = Path(lightning_meta.__file__).resolve().parent
DOOR = PACKAGE / "_compat.py"

# Private attributes of torch objects (modules, tensors, storages, ops, trackers)
# that the package needs; any name here outside _compat.py is a violation,
# whatever object it is read from.
PRIVATE_TORCH_ATTRIBUTES = frozenset(
    {
        "_C",
        "_apply",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_buffers",
        "_cdata",
        "_DisableFuncTorch",
        "_forward_hooks",
        "_forward_hooks_always_called",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_fw_post_hook",
        "_fw_pre_hook",
        "_get_append_fn",
        "_get_foreach_kernels_supported_devices",
        "_get_mod_name",
        "_get_pop_fn",
        "_len_torch_dispatch_stack",
        "_load_from_state_dict",
        "_load_state_dict_post_hooks",
        "_load_state_dict_pre_hooks",
        "_modules",
        "_non_persistent_buffers_set",
        "_parameters",
        "_schema",
        "_subclasses",
        "_version",
        "mod_tracker",
    }
)


def _is_private(segment: str) -> bool:
    return segment.startswith("_") and not segment.startswith("__")


def _dotted(node: ast.AST) -> list[str]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def violations(source: str, filename: str) -> list[str]:
    """Every private torch use in ``source``, as ``file:line: what``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch") and any(map(_is_private, alias.name.split("."))):
                    found.append(f"{filename}:{line}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            module = node.module or ""
            if any(map(_is_private, module.split("."))):
                found.append(f"{filename}:{line}: from {module} import ...")
            found += [
                f"{filename}:{line}: from {module} import {a.name}"
                for a in node.names
                if _is_private(a.name)
            ]
        elif isinstance(node, ast.Attribute):
            chain = _dotted(node)
            if chain and chain[0] == "torch" and any(map(_is_private, chain[1:])):
                found.append(f"{filename}:{line}: {'.'.join(chain)}")
            elif node.attr in PRIVATE_TORCH_ATTRIBUTES:
                found.append(f"{filename}:{line}: .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in PRIVATE_TORCH_ATTRIBUTES
        ):
            found.append(f"{filename}:{line}: {node.func.id}(..., {node.args[1].value!r})")
    # A deduplicated, stable list: torch._C._x yields one entry per chain prefix.
    return sorted(set(found))


def test_private_torch_apis_are_used_only_in_compat() -> None:
    found = [
        v
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != DOOR
        for v in violations(path.read_text(), str(path.relative_to(PACKAGE)))
    ]
    assert not found, "private torch APIs outside _compat.py:\n" + "\n".join(found)


def test_compat_is_where_they_are() -> None:
    # The scan must be able to fail: _compat.py itself is full of them.
    assert len(violations(DOOR.read_text(), "_compat.py")) >= 10


def test_the_scan_sees_each_kind_of_use() -> None:
    source = (
        "import torch._dynamo\n"
        "from torch._subclasses.fake_tensor import FakeTensor\n"
        "from torch.utils import _pytree\n"
        "n = torch._C._len_torch_dispatch_stack()\n"
        "v = t._version\n"
        "m._modules\n"
        "getattr(o, '_get_foreach_kernels_supported_devices')\n"
        "ok = torch.nn.Linear(2, 2).weight\n"
    )
    lines = {int(v.split(":")[1]) for v in violations(source, "x.py")}
    assert lines == {1, 2, 3, 4, 5, 6, 7}
