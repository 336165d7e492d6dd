"""The public API is exactly the documented names, and nothing else shows."""

from __future__ import annotations

import subprocess
import sys

import lightning_meta as lm

DOCUMENTED = [
    "ArgumentTypeError",
    "ArgumentValueError",
    "Ensemble",
    "Estimate",
    "Fit",
    "InputSpec",
    "LoadReport",
    "MaterializationError",
    "MetaFinding",
    "MetaGuard",
    "MetaTemplate",
    "MetaTensorError",
    "MetaTensorWarning",
    "ModuleEstimate",
    "RankEstimate",
    "TemplateState",
    "assert_no_meta",
    "deferred_init",
    "estimate",
    "fabric_setup",
    "find_fit",
    "find_meta_tensors",
    "is_deferred",
    "load_checkpoint",
    "materialize",
    "meta_template",
]


def test_all_is_the_documented_api() -> None:
    assert sorted(lm.__all__) == DOCUMENTED
    for name in DOCUMENTED:
        assert getattr(lm, name) is not None


def test_dir_shows_only_public_names() -> None:
    # As the Architecture issue checks it: a fresh interpreter, every non-underscore name.
    code = "import lightning_meta as lm; print(sorted(n for n in dir(lm) if not n.startswith('_')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(DOCUMENTED)


def test_importing_the_package_does_not_import_lightning() -> None:
    code = "import sys, lightning_meta; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_argument_errors_are_the_packages_and_pythons() -> None:
    import pytest
    import torch

    with pytest.raises(TypeError, match="expects an nn.Module") as info:
        lm.materialize(torch.zeros(2))  # type: ignore[arg-type]
    assert isinstance(info.value, lm.MetaTensorError)
    assert isinstance(info.value, lm.ArgumentTypeError)  # the name the docs use, public
    with pytest.raises(ValueError, match="floating point") as value_info:
        lm.materialize(torch.nn.Linear(2, 2), dtype=torch.int8)
    assert isinstance(value_info.value, lm.MetaTensorError)
    assert isinstance(value_info.value, lm.ArgumentValueError)
