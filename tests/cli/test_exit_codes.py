"""Exit status of every sub-command: 0 ok, 1 a problem in the model or file, 2 a bad command line
or a target that cannot be imported or built. Every failure is one message on standard error,
never a traceback; with ``--json``, standard output is empty or one JSON document.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning
import pytest
import torch

import lightning_meta
from lightning_meta import MetaTensorError
from lightning_meta._cli import main
from lightning_meta._cli._main import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    exit_status,
    report_failure,
    run_command,
)
from lightning_meta._cli._target import TargetError, guarded_build, load_target, target_factory
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError
from support.processes import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

MODELS = """
import sys

import lightning as L
import torch
from torch import nn


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)


class ExitsZero(nn.Module):
    def __init__(self):
        super().__init__()
        sys.exit(0)


class ExitsThree(nn.Module):
    def __init__(self):
        super().__init__()
        sys.exit(3)


class ExitsText(nn.Module):
    def __init__(self):
        super().__init__()
        sys.exit("no GPU here")


class Quit(BaseException):
    pass


class RaisesBase(nn.Module):
    def __init__(self):
        super().__init__()
        raise Quit("stop everything")


class Interrupted(nn.Module):
    def __init__(self):
        super().__init__()
        raise KeyboardInterrupt


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        raise ValueError("hidden must be even")


class RefusesWithFix(nn.Module):
    # the package's own refusal from inside a constructor (an Ensemble of meta members was one)
    def __init__(self):
        super().__init__()
        from lightning_meta import MetaTensorError

        raise MetaTensorError(
            "member 0 holds 'w' on the meta device. Fix: build it normally.", paths=["w"]
        )


class ExitsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        sys.exit(5)


def not_a_module():
    return 42
"""


CHATTY = """
import lightning as L
from torch import nn

print("imported: this line must not reach standard output")


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        print("constructed: nor this one")
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        print("forward: nor this one")
        return self.fc(x)

    def configure_optimizers(self):
        print("configure_optimizers: nor this one")
        return None
"""


@pytest.fixture
def chatty(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / f"lm_exit_chatty_{tmp_path.name.replace('-', '_')}.py"
    path.write_text(CHATTY)
    yield path
    sys.modules.pop(path.stem, None)


@pytest.fixture
def models(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / f"lm_exit_models_{tmp_path.name.replace('-', '_')}.py"
    path.write_text(MODELS)
    yield path
    sys.modules.pop(path.stem, None)


def _importing(tmp_path: Path, body: str) -> Iterator[Path]:
    path = tmp_path / f"lm_exit_import_{tmp_path.name.replace('-', '_')}.py"
    path.write_text(body)
    yield path
    sys.modules.pop(path.stem, None)


@pytest.fixture
def exits_on_import(tmp_path: Path) -> Iterator[Path]:
    yield from _importing(tmp_path, "import sys\nsys.exit(0)\n")


def _one_clean_message(err: str, command: str) -> None:
    assert "Traceback" not in err, err
    assert err.startswith(f"lightning-meta {command}: error: "), err
    assert sum(line.startswith("lightning-meta") for line in err.splitlines()) == 1, err


# ---------------------------------------------------------------- the mapping


def test_exit_status_of_each_kind_of_exception() -> None:
    assert exit_status(ArgumentValueError("x")) == exit_status(ArgumentTypeError("x")) == EXIT_USAGE
    assert exit_status(TargetError("x")) == EXIT_USAGE
    assert exit_status(MetaTensorError("x")) == EXIT_PROBLEM
    assert exit_status(ZeroDivisionError()) == EXIT_PROBLEM
    assert (
        exit_status(SystemExit(0)) == EXIT_PROBLEM
    )  # after the target was built: the model's doing
    assert exit_status(KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert (EXIT_OK, EXIT_PROBLEM, EXIT_USAGE) == (0, 1, 2)


def test_run_command_reports_instead_of_raising(capsys: pytest.CaptureFixture[str]) -> None:
    def unexpected() -> int:
        raise ZeroDivisionError("division by zero")

    assert run_command("demo", lambda: 0) == 0
    assert run_command("demo", unexpected) == EXIT_PROBLEM
    err = capsys.readouterr().err
    _one_clean_message(err, "demo")
    assert (
        "unexpected ZeroDivisionError: division by zero" in err
        and "LIGHTNING_META_TRACEBACK" in err
    )


def test_traceback_on_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIGHTNING_META_TRACEBACK", "1")
    assert report_failure("demo", ArgumentValueError("bad value")) == EXIT_USAGE
    # an exception that was never raised has no frames, but the header and message are printed
    assert "ArgumentValueError: bad value" in capsys.readouterr().err


def test_help_and_usage_errors_return_instead_of_exiting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    assert "Exit status" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == (
        f"lightning-meta {lightning_meta.__version__} (torch {torch.__version__}, lightning "
        f"{lightning.__version__}, Python {sys.version.split()[0]})\n"
    )
    assert main(["estimate", "--no-such-option"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert main(["estimate", "x:Y", "--depth", "two"]) == 2


# ---------------------------------------------------------------- bad command lines: 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizer", "adamx"], "unknown optimizer 'adamx'"),
        (["--precision", "17-true"], "unknown precision '17-true'"),
        (["--device", "bogus"], "device='bogus', which torch does not recognise"),
        (["--device", "meta"], "device='meta'"),
        (["--depth", "-1"], "depth must be >= 0"),
        (["--input", "99999999999999999999:float32"], "larger than any tensor dimension"),
        (["--input", "4611686018427387904,4:float32"], "more than a tensor can hold"),
        (["--input", "8,x:float32"], "comma-separated non-negative integers"),
        (["--input", "8,16:float33"], "unknown dtype 'float33'"),
        (["--input", "8,16", "--optimizer", "no_such_pkg:Opt"], "no module named 'no_such_pkg'"),
        ([], "no inputs for Linear"),
        (
            ["--input", "8,16", "--optimizer", "torch.nn:Linear"],
            "optimizer torch.nn.modules.linear.Linear is a class that is not a "
            "torch.optim.Optimizer subclass. Fix: pass --optimizer adamw or --optimizer "
            "torch.optim:AdamW",
        ),
    ],
)
def test_estimate_bad_command_line_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["estimate", "torch.nn:Linear", "--args", "[16, 4]", "--json"]
    if "--input" not in argv and argv:
        args += ["--input", "8,16"]
    assert main([*args, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_clean_message(captured.err, "estimate")
    assert message in captured.err


# ---------------------------------------------------------------- targets that cannot be built: 2


@pytest.mark.parametrize("command", ["check", "estimate"])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ExitsZero", "building it called sys.exit(0)"),
        ("ExitsThree", "building it called sys.exit(3)"),
        ("ExitsText", "building it called sys.exit('no GPU here')"),
        ("RaisesBase", "building it raised Quit (a BaseException): stop everything"),
        ("Broken", "building it raised ValueError: hidden must be even"),
        ("Nett", "has no attribute 'Nett'. Fix: use 'Net'"),
    ],
)
def test_target_that_cannot_be_built_exits_2(
    command: str, name: str, message: str, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, f"{models}:{name}", "--json"]
    if command == "estimate":
        argv += ["--input", "8,16"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_clean_message(captured.err, command)
    assert f"target '{models}:{name}'" in captured.err and message in captured.err
    assert captured.err.count("\n") == 1  # one line


@pytest.mark.parametrize("command", ["check", "estimate"])
def test_target_that_exits_on_import_exits_2(
    command: str, exits_on_import: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, f"{exits_on_import}:Net"] + (
        ["--input", "8,16"] if command == "estimate" else []
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    _one_clean_message(err, command)
    assert "called sys.exit(0)" in err and '`if __name__ == "__main__":`' in err
    assert exits_on_import.stem not in sys.modules
    assert str(exits_on_import.parent) not in sys.path


@pytest.mark.parametrize("command", ["check", "estimate"])
def test_a_refusal_with_its_own_fix_gets_no_second_fix(
    command: str, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it used to read "... Fix: build it normally.. Fix: fix the model's constructor ..."
    argv = [command, f"{models}:RefusesWithFix"] + (
        ["--input", "8,16"] if command == "estimate" else []
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    _one_clean_message(err, command)
    assert err.count("Fix:") == 1 and ".." not in err, err
    assert err.rstrip().endswith("raised MetaTensorError: member 0 holds 'w' on the meta "
                                 "device. Fix: build it normally."), err  # fmt: skip
    # estimate builds the model on meta: the message says where the refusal came from
    said = "building it under torch.device('meta') (where this command builds models, shape only)"
    assert (said in err) == (command == "estimate"), err


def test_estimate_hf_factory_that_cannot_be_built_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("transformers")
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "vocab_size": -1}  # fmt: skip
    assert main(["estimate", "--hf-config", json.dumps(config), "--input", "1,4:int64"]) == 2
    err = capsys.readouterr().err
    _one_clean_message(err, "estimate")
    assert "target 'AutoModelForCausalLM(llama config)': building it raised RuntimeError" in err
    assert "(run under torch.device('meta')). Fix:" in err


def test_check_of_something_that_is_not_a_module_exits_2(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", f"{models}:not_a_module"]) == 2
    assert "built a int, not an nn.Module" in capsys.readouterr().err


def test_keyboard_interrupt_is_not_swallowed_into_a_target_error(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(KeyboardInterrupt):
        target_factory(f"{models}:Interrupted")()
    assert main(["check", f"{models}:Interrupted"]) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_target_errors_are_meta_tensor_errors(models: Path) -> None:
    with pytest.raises(TargetError, match=r"building it called sys.exit\(3\)") as info:
        target_factory(f"{models}:ExitsThree")()
    assert isinstance(info.value, MetaTensorError)
    with pytest.raises(TargetError, match=r"raised Quit \(a BaseException\)"):
        guarded_build("x:y", lambda: target_factory(f"{models}:RaisesBase")())()
    with pytest.raises(TargetError, match=r"no module named 'no_such_pkg'"):
        load_target("no_such_pkg:X")


# ---------------------------------------------------------------- problems in the model: 1


def test_problem_in_the_model_exits_1(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", f"{models}:Net", "--input", "8,15", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_clean_message(captured.err, "estimate")
    assert "in module 'fc'" in captured.err


def test_sys_exit_after_the_target_was_built_exits_1(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["estimate", f"{models}:ExitsInForward", "--input", "8,16", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_clean_message(captured.err, "estimate")
    assert "the model's code called sys.exit(5)" in captured.err


def test_unexpected_exception_is_a_clean_message(
    models: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lightning_meta._estimate._estimate as module

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(module, "estimate", boom)
    assert main(["estimate", f"{models}:Net", "--input", "8,16", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_clean_message(captured.err, "estimate")
    assert "unexpected KeyError: 'surprise'" in captured.err


# ---------------------------------------------------------------- standard output: only ours


@pytest.mark.parametrize("command", ["check", "estimate"])
def test_prints_of_the_model_go_to_stderr(
    command: str, chatty: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, f"{chatty}:Net", "--json"] + (
        ["--input", "8,16"] if command == "estimate" else []
    )
    assert main(argv) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert "imported:" in captured.err and "constructed:" in captured.err
    assert ("forward:" if command == "estimate" else "configure_optimizers:") in captured.err


def test_subprocess_sys_exit_targets_exit_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "lm_exit_sub.py").write_text(MODELS)
    (tmp_path / "lm_exit_sub_import.py").write_text("import sys\nsys.exit(0)\n")
    for argv in (
        ["check", "lm_exit_sub.py:ExitsZero"],
        ["estimate", "lm_exit_sub.py:ExitsZero", "--input", "8,16", "--json"],
        ["check", "lm_exit_sub_import.py:Net", "--json"],
    ):
        proc = run_cli(*argv, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert f"target '{argv[1]}'" in lines[0] and "called sys.exit(0)" in lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["estimate", "torch.nn:Linear", "--bogus"], "unrecognized arguments: --bogus"),
        (["check", "torch.nn:Linear", "--bogus"], "unrecognized arguments: --bogus"),
        (["load-check", "torch.nn:Linear", "x.pt", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["estimate", "torch.nn:Linear", "--strategy", "foo"],
            "argument --strategy: invalid choice: 'foo'",
        ),
        (["estimate", "torch.nn:Linear", "--depth", "two"], "argument --depth: invalid int value"),
        (["check"], "the following arguments are required: TARGET"),
    ],
)
def test_subprocess_usage_errors_are_one_line_naming_the_command(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    # an unknown option used to print the top-level usage and "lightning-meta: error: ..."
    proc = run_cli(*argv, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    command = argv[0]
    assert lines[0].startswith(f"lightning-meta {command}: error: {message}"), lines[0]
    assert lines[0].endswith(f". Fix: see 'lightning-meta {command} --help'."), lines[0]


@pytest.mark.parametrize("command", ["check", "estimate", "load-check"])
def test_subprocess_help_of_every_command_lists_the_exit_statuses(
    command: str, tmp_path: Path
) -> None:
    # estimate --help and load-check --help used to say nothing of them
    proc = run_cli(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "Exit status: 0 " in text, text
    for status in (
        "; 1 ",
        "; 2 a bad command line",
        "cannot be imported or built",
        "; 130 interrupted.",
    ):
        assert status in text, (status, text)


def test_subprocess_stdout_is_only_json(tmp_path: Path) -> None:
    (tmp_path / "lm_exit_sub_json.py").write_text(CHATTY)
    for argv in (
        ["estimate", "lm_exit_sub_json.py:Net", "--input", "8,16", "--json"],
        ["check", "lm_exit_sub_json.py:Net", "--json"],
    ):
        proc = run_cli(*argv, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        json.loads(proc.stdout)  # the model's prints went to stderr
        assert "imported:" in proc.stderr
    bad = run_cli(
        "estimate",
        "lm_exit_sub_json.py:Net",
        "--input",
        "99999999999999999999:float32",
        "--json",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert "larger than any tensor dimension" in bad.stderr


def test_load_check_gets_the_same_target_errors(
    models: Path, exits_on_import: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # load-check builds its target through _target too: sys.exit there is a bad target as well
    missing = str(tmp_path / "missing.pt")
    assert main(["load-check", f"{models}:ExitsZero", missing]) == 2
    assert "called sys.exit(0)" in capsys.readouterr().err
    assert main(["load-check", f"{exits_on_import}:Net", missing]) == 2
    err = capsys.readouterr().err
    assert "called sys.exit(0)" in err and "Traceback" not in err


def test_the_fix_names_the_arguments_option_of_each_command(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # check takes the arguments as ARGS_JSON, estimate and load-check as --args
    missing = str(tmp_path / "missing.pt")
    for argv, given in (
        (["check", f"{models}:Broken"], "(ARGS_JSON)"),
        (["estimate", f"{models}:Broken", "--input", "8,16"], "(--args)"),
        (["load-check", f"{models}:Broken", missing], "(--args)"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"fix the model's constructor or the arguments it gets {given}" in err, err
        assert "--hf-config" not in err


def test_load_check_shows_no_progress_bar_with_json_or_off_a_terminal(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    path = tmp_path / "net.pt"
    torch.save({"fc.weight": torch.zeros(4, 16), "fc.bias": torch.zeros(4)}, path)
    assert main(["load-check", f"{models}:Net", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)
    assert captured.err == ""  # standard error is not a terminal here
    assert main(["load-check", f"{models}:Net", str(path)]) == 0
    assert capsys.readouterr().err == ""
