"""The command line, hostile review of 2026-12-05.

- A TARGET file named after a module not yet imported (``rich.py``, ``yaml.py``)
  hid it: ``load-check`` loaded, then exited 1 with nothing on stderr (the report
  printer imports rich); it is now refused, exit 2, naming the module it hides.
- ``load-check --json``: a load post-hook that prints wrote before the JSON.
- A whole module saved with ``torch.save(model)``: the fix was ``--trust`` of
  names printed in a form ``--trust`` refused, after which the file was refused
  anyway; the refusal now says to re-save its state_dict. A bad ``--trust`` is
  named as ``--trust``, not as a target.
- An index that puts a key in a shard it does not list said "found in None".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_meta._cli import main
from support.processes import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)


class Printy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_load_state_dict_post_hook(lambda module, keys: print("POST HOOK PRINT"))
"""


@pytest.mark.parametrize("name", ["rich", "yaml"])
def test_a_target_file_named_after_an_installed_module_is_refused(
    tmp_path: Path, name: str
) -> None:
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / f"{name}.py").write_text(NET)
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "lin.pt")
    for argv in (
        ["load-check", f"shadow/{name}.py:Net", "lin.pt"],
        ["check", f"shadow/{name}.py:Net"],
    ):
        proc = run_cli(*argv, cwd=tmp_path)  # a fresh process: the module not yet imported
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        assert f"its module name {name!r} is also the name of the installed module" in proc.stderr
        assert f"Fix: rename {name}.py." in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_what_a_target_file_name_hides_or_does_not(tmp_path: Path) -> None:
    torch.save({f"lin.{k}": v for k, v in nn.Linear(3, 2).state_dict().items()}, tmp_path / "n.pt")
    # a standard library module nothing imports, and a module of the working
    # directory beside a file of that name elsewhere: imported as before
    (tmp_path / "std").mkdir()
    (tmp_path / "std" / "test.py").write_text(NET)
    (tmp_path / "models.py").write_text(NET)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "models.py").write_text(NET.replace("nn.Linear(3, 2)", "nn.Linear(3, 5)"))
    for target in ("std/test.py:Net", "sub/models.py:Net"):
        proc = run_cli("load-check", target, "n.pt", "--no-strict", "--json", cwd=tmp_path)
        assert proc.returncode == 0, (target, proc.stderr)
    proc = run_cli("load-check", "sub/models.py:Net", "n.pt", "--json", cwd=tmp_path)
    assert proc.returncode == 1 and "shape mismatch" in proc.stderr  # sub/models.py's own Net
    # a package of the same name beside the file: Python would import the package
    (tmp_path / "pk" / "net").mkdir(parents=True)
    (tmp_path / "pk" / "net.py").write_text(NET)
    (tmp_path / "pk" / "net" / "__init__.py").write_text(NET.replace("self.lin", "self.other"))
    proc = run_cli("load-check", "pk/net.py:Net", "n.pt", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "its module name 'net' is also the name of the package" in proc.stderr


def test_a_target_file_in_the_working_directory_is_not_its_own_shadow(tmp_path: Path) -> None:
    (tmp_path / "lm_review7_net.py").write_text(NET)
    torch.save({f"lin.{k}": v for k, v in nn.Linear(3, 2).state_dict().items()}, tmp_path / "n.pt")
    proc = run_cli("load-check", "lm_review7_net.py:Net", "n.pt", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == ["lin.bias", "lin.weight"]


def test_load_check_json_keeps_a_load_hooks_print_off_stdout(tmp_path: Path) -> None:
    (tmp_path / "lm_review7_printy.py").write_text(NET)
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "lin.pt")
    torch.save({f"lin.{k}": v for k, v in nn.Linear(3, 2).state_dict().items()}, tmp_path / "p.pt")
    for init in ("deferred", "meta"):
        proc = run_cli(
            "load-check", "lm_review7_printy.py:Printy", "p.pt", "--json", "--init", init,
            cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        json.loads(proc.stdout)
        assert "POST HOOK PRINT" in proc.stderr


def test_torch_nn_classes_in_a_pickle_name_both_causes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A whole model, or a loss kept beside the weights (a Lightning checkpoint's
    # hyperparameters), which --trust loads (a whole model too, since 2026-12-07).
    (tmp_path / "lm_review7_whole.py").write_text(NET)
    torch.save(nn.Sequential(nn.Linear(3, 2)), tmp_path / "whole.pt")
    weights = {f"lin.{k}": v for k, v in nn.Linear(3, 2).state_dict().items()}
    torch.save({"state_dict": weights, "loss": nn.CrossEntropyLoss()}, tmp_path / "hp.pt")
    target = f"{tmp_path / 'lm_review7_whole.py'}:Net"
    for name in ("whole.pt", "hp.pt"):
        assert main(["load-check", target, str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert "Among them are torch.nn modules: the file holds a whole model" in err
        assert "trusting them loads each such module's parameters" in err
        assert "--trust module:Name" in err
    assert "'torch.nn.modules.linear:Linear'" in err or "'torch.nn.modules.loss:" in err
    trust = ["--trust", "torch.nn.modules.loss:CrossEntropyLoss"]
    assert main(["load-check", target, str(tmp_path / "hp.pt"), *trust]) == 0
    assert "loaded 2 tensors" in capsys.readouterr().out


def test_unsafe_globals_are_listed_as_trust_takes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lm_review7_unsafe.py").write_text(NET)
    torch.save({"lin.weight": torch.zeros(2, 3), "step": Path("x")}, tmp_path / "odd.pt")
    target = f"{tmp_path / 'lm_review7_unsafe.py'}:Net"
    assert main(["load-check", target, str(tmp_path / "odd.pt")]) == 1
    err = capsys.readouterr().err
    assert "'pathlib:PosixPath'" in err and "--trust module:Name" in err
    assert main(["load-check", target, str(tmp_path / "odd.pt"), "--trust", "pathlib.Path"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-meta load-check: error: --trust 'pathlib.Path': expected")


def test_an_index_naming_a_shard_without_the_key_says_where_it_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lm_review7_index.py").write_text(NET)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"lin.bias": torch.zeros(2)}, ckpt / "s1.safetensors")
    save_file({"lin.weight": torch.zeros(2, 3)}, ckpt / "s2.safetensors")
    index = {"weight_map": {"lin.bias": "s1.safetensors", "lin.weight": "s1.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    target = f"{tmp_path / 'lm_review7_index.py'}:Net"
    assert main(["load-check", target, str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "'lin.weight': index says 's1.safetensors', in no shard the index lists" in err


def test_a_target_in_the_users_own_installed_package_imports_the_local_copy(tmp_path: Path) -> None:
    # Found by the regression sweep of 2026-12-05: the user's own package, also
    # pip-installed (not editable), was refused as hiding "the installed module", and the
    # fix named the folder above the package.
    site = tmp_path / "env" / "site-packages"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "proj" / "mypkg").mkdir(parents=True)
    (tmp_path / "proj" / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "proj" / "mypkg" / "model.py").write_text(NET)
    torch.save({f"lin.{k}": v for k, v in nn.Linear(3, 2).state_dict().items()}, tmp_path / "n.pt")
    env = {"PYTHONPATH": str(site)}
    # Another installed package of that name (no model.py in it): refused, the fix
    # naming the package.
    proc = run_cli("load-check", "proj/mypkg/model.py:Net", "n.pt", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "is also the name of the installed module" in proc.stderr
    assert f"Fix: rename the package {str(tmp_path / 'proj' / 'mypkg')!r}." in proc.stderr
    # An installed copy of the same package (it holds model.py too): the local file.
    (site / "mypkg" / "model.py").write_text(NET.replace("nn.Linear(3, 2)", "nn.Linear(3, 7)"))
    proc = run_cli("load-check", "proj/mypkg/model.py:Net", "n.pt", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr  # the local Linear(3, 2), not the installed (3, 7)
    assert json.loads(proc.stdout)["loaded"] == ["lin.bias", "lin.weight"]


@pytest.mark.parametrize("name", ["click", "regex"])
def test_a_file_named_after_what_transformers_imports_is_refused(tmp_path: Path, name: str) -> None:
    # The regression sweep of 2026-12-05: refusing only what torch, Lightning and this
    # package declare as requirements let click.py through, which transformers (imported by
    # torchmetrics when installed) then failed to import.
    pytest.importorskip(name)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / f"{name}.py").write_text(NET)
    proc = run_cli("check", f"t/{name}.py:Net", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"its module name {name!r} is also the name of the installed module" in proc.stderr


CONFIGURED = """
import lightning as L
import torch
from torch import nn

import lightning_meta as lm


class Configured(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            with lm.deferred_init():
                self.net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NeedsMesh(Configured):
    def configure_model(self) -> None:
        self.device_mesh["data_parallel"]  # None outside a Trainer's ModelParallelStrategy


def inner() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))


# Layers in __init__; configure_model only shards them (Lightning's tensor-parallel pattern).
class Parallelized(L.LightningModule):

    def __init__(self) -> None:
        super().__init__()
        self.net = inner()

    def configure_model(self) -> None:
        print("CONFIGURE PRINT")
        self.device_mesh["tensor_parallel"]


class Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class Cast(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Rotary()

    def configure_model(self) -> None:
        self.net.to(torch.bfloat16)


class Empty(Cast):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(8))  # uninitialised: the checkpoint fills it


class NotLightning(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = inner()

    def configure_model(self, config: dict) -> None:  # not Lightning's hook
        raise AssertionError("called")
"""


def test_load_check_calls_configure_model_as_load_from_checkpoint_does(tmp_path: Path) -> None:
    # A module building its layers in configure_model was refused as not matching its own
    # checkpoint, with fixes that could not apply (review of 2026-12-05, fifth session).
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_meta as lm

    (tmp_path / "lm_review7_configured.py").write_text(CONFIGURED)
    space: dict[str, object] = {}
    exec(compile(CONFIGURED, "lm_review7_configured.py", "exec"), space)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[lm.MetaGuard()],
    )  # fmt: skip
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer.fit(space["Configured"](), data)  # type: ignore[operator]
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    for init in ("deferred", "meta"):
        proc = run_cli(
            "load-check", "lm_review7_configured.py:Configured", "c.ckpt", "--json",
            "--init", init, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)["loaded"]) == 4
    proc = run_cli("load-check", "lm_review7_configured.py:NeedsMesh", "c.ckpt", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "its configure_model, which load-check calls as Lightning's" in proc.stderr
    assert "raised TypeError" in proc.stderr and "point TARGET at a function" in proc.stderr
    # The fix applies: a factory of the inner model, the checkpoint's prefix found.
    proc = run_cli("load-check", "lm_review7_configured.py:inner", "c.ckpt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "prefix 'net.' stripped" in proc.stdout
    # Found by the regression sweep of the first version: layers __init__ built and a
    # configure_model that needs a Trainer load as built, which a note says; a cast there
    # casts real values, as load_from_checkpoint's eager build does; a plain module's own
    # configure_model is not Lightning's hook.
    torch.save(
        {f"net.{k}": v for k, v in space["inner"]().state_dict().items()},  # type: ignore[operator]
        tmp_path / "net.pt",
    )
    torch.save(space["Cast"]().state_dict(), tmp_path / "cast.pt")  # type: ignore[operator]
    torch.save(space["Empty"]().state_dict(), tmp_path / "empty.pt")  # type: ignore[operator]
    for target, checkpoint in [
        ("Parallelized", "net.pt"),
        ("NotLightning", "net.pt"),
        ("Cast", "cast.pt"),
        ("Empty", "empty.pt"),  # the second version materialized it first, and refused
    ]:
        for init in ("deferred", "meta"):
            proc = run_cli(
                "load-check", f"lm_review7_configured.py:{target}", checkpoint, "--json",
                "--init", init, cwd=tmp_path,
            )  # fmt: skip
            assert proc.returncode == 0, (target, init, proc.stderr)
            loaded = {"Cast": 2, "Empty": 3}.get(target, 4)
            assert len(json.loads(proc.stdout)["loaded"]) == loaded
            if target == "Parallelized":
                assert "CONFIGURE PRINT" in proc.stderr  # not in the JSON document
                assert "note: the configure_model of" in proc.stderr
                assert "raised TypeError" in proc.stderr
