"""The command line's leftovers of the nineteenth review (2026-12-07, fifth session).

- ``load-check`` of a LightningModule class built it with its defaults, not with the
  ``hyper_parameters`` its checkpoint holds (``load_from_checkpoint`` builds it with
  them): a model saved with other sizes was refused as not matching its own
  checkpoint, and the fix named neither the arguments nor ``--args``;
- ``estimate --fit sequence`` of a model whose own code refuses a length (litgpt's
  "Cannot forward sequence of length") failed instead of answering that length; a
  model that runs only some lengths must still get no answer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_meta import MetaTensorError, MetaTensorWarning, find_fit
from support.processes import run_cli

_MODELS = """
import torch
from torch import nn
import lightning as L


class Sized(L.LightningModule):
    def __init__(self, hidden: int = 8, depth: int = 1):
        super().__init__()
        self.save_hyperparameters()
        layers = [nn.Linear(4, hidden)] + [nn.Linear(hidden, hidden) for _ in range(depth)]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Configured(L.LightningModule):
    \"\"\"save_hyperparameters(config): Lightning passes the saved dict as `config`.\"\"\"

    def __init__(self, config: dict | None = None):
        super().__init__()
        config = config or {"hidden": 8}
        self.save_hyperparameters(config)
        self.net = nn.Linear(4, config["hidden"])

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Unsaved(L.LightningModule):
    \"\"\"No save_hyperparameters: the checkpoint cannot say how it was built.\"\"\"

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Linear(4, hidden)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Multiples(nn.Module):
    \"\"\"Takes only lengths that divide by 16: no largest length to search for.\"\"\"

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)

    def forward(self, ids):
        if ids.size(1) % 16:
            raise ValueError(f"length {ids.size(1)} must divide by 16")
        return self.emb(ids)


def tiny_gpt():
    from litgpt import GPT, Config

    return GPT(Config(block_size=64, vocab_size=128, padded_vocab_size=128, n_layer=1,
                      n_head=2, n_embd=32))
"""


def _fit_and_save(module: L.LightningModule, path: Path) -> None:
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import importlib.util
    import sys

    root = tmp_path_factory.mktemp("review20")
    (root / "models.py").write_text(_MODELS)
    spec = importlib.util.spec_from_file_location("review20_models", root / "models.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["review20_models"] = mod
    spec.loader.exec_module(mod)
    _fit_and_save(mod.Sized(hidden=16, depth=2), root / "sized.ckpt")
    _fit_and_save(mod.Configured({"hidden": 16}), root / "configured.ckpt")
    _fit_and_save(mod.Unsaved(hidden=16), root / "unsaved.ckpt")
    # what Lightning itself does with these files
    assert mod.Sized.load_from_checkpoint(root / "sized.ckpt").net[0].out_features == 16
    assert mod.Configured.load_from_checkpoint(root / "configured.ckpt").net.out_features == 16
    return root


def test_a_lightning_module_is_built_with_its_checkpoints_hyper_parameters(models: Path) -> None:
    done = run_cli("load-check", "models.py:Sized", "sized.ckpt", "--json", cwd=models)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["loaded"]) == 8
    assert "Sized built with the checkpoint's hyper_parameters (hidden=16, depth=2)" in (
        done.stderr
    )
    done = run_cli("load-check", "models.py:Configured", "configured.ckpt", cwd=models)
    assert done.returncode == 0, done.stderr
    assert "config={'hidden': 16}" in done.stderr


def test_args_override_the_saved_values_as_load_from_checkpoints_keywords(models: Path) -> None:
    done = run_cli(
        "load-check", "models.py:Sized", "sized.ckpt", "--args", '{"depth": 1}', cwd=models
    )
    assert done.returncode == 1, done.stderr
    assert "hyper_parameters (hidden=16)" in done.stderr
    assert "'net.3.weight'" in done.stderr  # the saved depth's layer: unexpected
    assert "(its arguments: --args)" in done.stderr
    positional = run_cli(
        "load-check", "models.py:Sized", "sized.ckpt", "--args", "[16]", cwd=models
    )
    assert positional.returncode == 0, positional.stderr
    assert "hyper_parameters (depth=2)" in positional.stderr


def test_without_saved_hyper_parameters_the_fix_names_args(models: Path) -> None:
    done = run_cli("load-check", "models.py:Unsaved", "unsaved.ckpt", cwd=models)
    assert done.returncode == 1
    assert "has shape (8, 4) in the model but (16, 4) in the checkpoint" in done.stderr
    assert "Fix: build the model the checkpoint was saved from (its arguments: --args)" in (
        done.stderr
    )
    assert "hyper_parameters" not in done.stderr
    fixed = run_cli(
        "load-check", "models.py:Unsaved", "unsaved.ckpt", "--args", '{"hidden": 16}', cwd=models
    )
    assert fixed.returncode == 0, fixed.stderr


def test_a_length_the_models_own_code_refuses_bounds_the_search(models: Path) -> None:
    import review20_models as m  # type: ignore[import-not-found]

    with pytest.raises(ValueError, match="Cannot forward sequence of length 65"):
        m.tiny_gpt()(torch.zeros(1, 65, dtype=torch.long))
    with pytest.warns(MetaTensorWarning, match="CPU kernels allocate scratch memory"):
        fit = find_fit(m.tiny_gpt, "1,16:int64", vary="sequence", memory="1GiB")
    assert fit.value == 64 and not fit.at_limit
    assert fit.refused == "longer than GPT.max_seq_length (64)"
    done = run_cli(
        "estimate", "models.py:tiny_gpt", "--input", "1,16:int64", "--fit", "sequence",
        "--memory", "1GiB", cwd=models,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "largest sequence length within 1.00 GiB per device: 64" in " ".join(done.stdout.split())


def test_a_model_that_runs_only_some_lengths_gets_no_answer(models: Path) -> None:
    # a refusal by the model's own code is no bound (a first version took it for one:
    # square token grids answered 36 where 8100 fit)
    import review20_models as m

    m.Multiples()(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(MetaTensorError, match=r"the model refuses them .*must divide by 16"):
        find_fit(m.Multiples, "1,16:int64", vary="sequence", memory="1MiB")
    with pytest.raises(
        MetaTensorError, match=r"the model refuses them .*_Squares failed.*AssertionError"
    ):
        find_fit(_Squares, "2,16,4", vary="sequence", memory="64MiB")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    "argv",
    [
        ("check", "models.py:Sized"),
        ("estimate", "models.py:Multiples", "--input", "1,16:int64", "--json"),
        ("load-check", "models.py:Sized", "sized.ckpt"),
    ],
)
def test_a_full_standard_output_is_named_not_blamed_on_the_model(
    models: Path, argv: tuple[str, ...]
) -> None:
    import os
    import subprocess
    import sys

    import lightning_meta

    env = {**os.environ, "PYTHONPATH": str(Path(lightning_meta.__file__).parent.parent)}
    env.pop("LIGHTNING_META_TRACEBACK", None)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "lightning_meta", *argv],
            stdout=full, stderr=subprocess.PIPE, text=True, cwd=models, env=env, timeout=300,
            check=False,
        )  # fmt: skip
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error == (
        f"lightning-meta {argv[0]}: error: cannot write the report to standard output (No "
        "space left on device). Fix: send it where there is room (> another file), or free "
        "space there."
    )


def test_paths_that_are_no_file_say_what_they_are(models: Path, tmp_path: Path) -> None:
    import os

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.ckpt")
    os.mkfifo(tmp_path / "fifo")
    cases = {
        "a": "Too many levels of symbolic links. Fix: a symbolic link on the path leads back "
        "to itself",
        "dangling": f"is a symbolic link to {str(tmp_path / 'gone.ckpt')!r}, which does not exist",
        "fifo": "is neither a file nor a directory (a device, a pipe or a socket)",
        "missing": "no checkpoint at",
    }
    for name, says in cases.items():
        done = run_cli("load-check", "models.py:Sized", str(tmp_path / name), cwd=models)
        assert done.returncode == 1 and says in done.stderr, (name, done.stderr)
    (tmp_path / "empty").mkdir()
    done = run_cli(
        "estimate", "--hf-config", str(tmp_path / "empty"), "--input", "1,8:int64", cwd=models
    )
    assert done.returncode == 2
    assert "is a folder without a config.json. Fix: pass the folder save_pretrained wrote" in (
        done.stderr
    )


def test_what_cannot_be_passed_is_refused_and_args_get_past_it(tmp_path: Path) -> None:
    # the second review: the refusals' fix, --args, did not get past them
    (tmp_path / "held.py").write_text(
        "import torch\nfrom torch import nn\nimport lightning as L\n\n\n"
        "class Weighted(L.LightningModule):\n"
        "    def __init__(self, hidden=4, class_weights=None):\n"
        "        super().__init__()\n"
        "        self.save_hyperparameters()\n"
        "        self.net = nn.Linear(3, hidden)\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        import held  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    model = held.Weighted(hidden=7, class_weights=torch.tensor([1.0, 3.0]))
    saved = {"state_dict": model.state_dict(), "pytorch-lightning_version": L.__version__}
    torch.save({**saved, "hyper_parameters": dict(model.hparams)}, tmp_path / "w.ckpt")
    cli = {"hidden": 7, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({**saved, "hyper_parameters": cli}, tmp_path / "cli.ckpt")
    for ckpt, says in (
        ("w.ckpt", "hyper_parameters.class_weights is a tensor"),
        ("cli.ckpt", "saved by LightningCLI"),
    ):
        refused = run_cli("load-check", "held.py:Weighted", ckpt, cwd=tmp_path)
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
        assert "Fix: pass" in refused.stderr and "--args" in refused.stderr
    done = run_cli(
        "load-check",
        "held.py:Weighted",
        "w.ckpt",
        "--args",
        '{"class_weights": null}',
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "hyper_parameters (hidden=7)" in done.stderr
    done = run_cli(
        "load-check", "held.py:Weighted", "cli.ckpt", "--args", '{"hidden": 7}', cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "built with --args alone" in done.stderr


class _ChannelsFirst(torch.nn.Module):
    """Dim 1 is a feature size, asserted by torch's own attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        out: torch.Tensor = self.attn(y, y, y)[0]
        return out


class _Even(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) % 2:
            raise ValueError(f"length {x.size(1)} must be even")
        out: torch.Tensor = self.lin(x)
        return out


def test_torchs_own_refusals_and_a_limit_give_no_silent_answer() -> None:
    # the second review: torch's assert was taken as the model's bound (16 answered), and
    # with limit= below twice the answer the multiples went unchecked (938 of 1000)
    with pytest.raises(MetaTensorError, match=r"was expecting embedding dimension.*--fit batch"):
        find_fit(_ChannelsFirst, "2,16,8", vary="sequence", memory="1GiB")
    with pytest.raises(MetaTensorError, match=r"must be even"):
        find_fit(_Even, "2,8,8", vary="sequence", memory="1GiB", limit=1001)


class _Squares(torch.nn.Module):
    """Tokens of a square grid, checked by the model's own assert (as ViT-like models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.size(1))
        assert side * side == x.size(1), x.size(1)
        out: torch.Tensor = self.lin(x)
        return out
