"""MetaGuard under DeepSpeedStrategy refuses before anything is allocated, naming what to use.

Lightning's DeepSpeedStrategy cannot be constructed without the `deepspeed`
package, and runs only on CUDA (on the CPU, Lightning itself refuses it in
`setup_environment`, before any callback runs: checked with deepspeed 0.19.8
built without ops), so the test runs only where both are present.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lightning_meta as lm
from support.guard_models import Seeded, loader, trainer


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="DeepSpeedStrategy needs CUDA in Lightning"
)
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed: Lightning cannot construct DeepSpeedStrategy without it",
)
@pytest.mark.parametrize("mode", ["init", "configure"])
def test_deepspeed_is_refused_before_allocation(mode: str) -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    model = Seeded(mode)
    t = trainer(strategy=DeepSpeedStrategy(stage=3), accelerator="cuda", devices=1)
    with pytest.raises(lm.MetaTensorError, match="ModelParallelStrategy") as info:
        t.fit(model, loader())
    assert "DeepSpeedStrategy" in str(info.value) and "Fix:" in str(info.value)
    assert model.model is None or all(p.is_meta for p in model.model.parameters())
