"""Bad arguments of estimate() are refused before anything runs, as TypeError / ValueError.

Also checks the phases of estimate one at a time: options, inputs, fake state,
the simulated step and the assembled result.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_meta import InputSpec, MetaTensorError, estimate
from lightning_meta._compat import FakeTensorMode
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError
from lightning_meta._estimate._estimate import fake_step, run_step, simulate
from lightning_meta._estimate._fake import fake_state, inputs_of
from lightning_meta._estimate._optimizer import prepare_optimizer, trainable_parameters
from lightning_meta._estimate._options import resolve_options
from lightning_meta._estimate._result import assemble


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def _refused(kind: type[Exception], match: str, *args: Any, **kwargs: Any) -> Exception:
    """Call estimate, check it raises ``kind`` (and the package's base) matching ``match``."""
    python = TypeError if kind is ArgumentTypeError else ValueError
    with pytest.raises(kind, match=match) as info:
        estimate(*args, **kwargs)
    assert isinstance(info.value, python)
    assert isinstance(info.value, MetaTensorError)
    return info.value


# ---------------------------------------------------------------- device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_cuda_without_cuda_is_refused_not_aborted() -> None:
    # asking a CPU-only torch for CUDA properties aborts the process; the
    # device must be checked before the step touches it
    _refused(
        ArgumentValueError,
        r"estimate got device='cuda.*no usable cuda device.*Fix: pass device='cpu'",
        mlp,
        "8,32:float32",
        device="cuda",
    )
    _refused(
        ArgumentValueError, r"device='cuda:1'.*no usable cuda", mlp, "8,32:float32", device="cuda:1"
    )


def test_unknown_device() -> None:
    _refused(
        ArgumentValueError,
        r"estimate got device='bogus', which torch does not recognise.*Fix: pass a device",
        mlp,
        "8,32:float32",
        device="bogus",
    )


def test_device_of_the_wrong_type() -> None:
    _refused(
        ArgumentTypeError,
        r"device=2.5 \(float\); expected a torch.device",
        mlp,
        "8,32:float32",
        device=2.5,
    )


def test_meta_device_says_why() -> None:
    _refused(
        ArgumentValueError,
        r"device='meta' picks kernels no real device runs.*Fix: pass the device",
        mlp,
        "8,32:float32",
        device=torch.device("meta"),
    )


def test_a_bad_option_fails_before_the_factory_runs() -> None:
    calls: list[int] = []

    def factory() -> nn.Module:
        calls.append(1)
        return mlp()

    _refused(ArgumentValueError, r"device='bogus'", factory, "8,32:float32", device="bogus")
    _refused(ArgumentValueError, r"unknown precision", factory, "8,32:float32", precision="8-true")
    assert calls == []


# ---------------------------------------------------------------- other options


def test_precision() -> None:
    _refused(
        ArgumentValueError,
        r"unknown precision 'fp8'.*Fix: use one of.*bf16-mixed",
        mlp,
        "8,32:float32",
        precision="fp8",
    )
    _refused(
        ArgumentTypeError,
        r"precision=torch.bfloat16 is a dtype, not a Lightning precision name.*Fix: pass one of.*bf16-true",
        mlp,
        "8,32:float32",
        precision=torch.bfloat16,
    )


def test_optimizer() -> None:
    _refused(
        ArgumentValueError,
        r"unknown optimizer 'lion'.*Fix: use one of sgd",
        mlp,
        "8,32:float32",
        optimizer="lion",
    )
    _refused(
        ArgumentTypeError,
        r"optimizer must be a name.*got int 42.*Fix: pass",
        mlp,
        "8,32:float32",
        optimizer=42,
    )
    instance = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    _refused(
        ArgumentTypeError,
        r"got an SGD instance, which holds other parameters. Fix: pass optimizer='adamw', optimizer=torch.optim.AdamW",
        mlp,
        "8,32:float32",
        optimizer=instance,
    )


def test_loop_depth_and_loss() -> None:
    _refused(
        ArgumentValueError,
        r"loop must be 'lightning' or 'plain', got 'eager'. Fix",
        mlp,
        "8,32:float32",
        loop="eager",
    )
    _refused(ArgumentValueError, r"depth must be >= 0, got -1. Fix", mlp, "8,32:float32", depth=-1)
    _refused(
        ArgumentTypeError, r"depth must be an int, got float. Fix", mlp, "8,32:float32", depth=1.5
    )
    _refused(
        ArgumentTypeError, r"loss_fn must be callable, got int. Fix", mlp, "8,32:float32", loss_fn=3
    )
    _refused(
        ArgumentTypeError,
        r"gradient_as_bucket_view must be True or False, got 'no'",
        mlp,
        "8,32:float32",
        strategy="ddp",
        world_size=2,
        gradient_as_bucket_view="no",
    )
    for text in ("False", "no", 0, None):  # a string from a config file was read as True
        _refused(
            ArgumentTypeError,
            r"extrapolate must be True or False, got .*Fix: pass extrapolate=False",
            mlp,
            "8,32:float32",
            extrapolate=text,
        )


# ---------------------------------------------------------------- the model and its inputs


def test_module_or_factory() -> None:
    _refused(
        ArgumentTypeError,
        r"expected an nn.Module or a factory returning one, got int. Fix",
        42,
        "8,32:float32",
    )
    _refused(
        ArgumentTypeError,
        r"factory '.*<lambda>' returned int, expected an nn.Module. Fix",
        lambda: 3,
        "8,32:float32",
    )


def test_input_specs() -> None:
    _refused(
        ArgumentValueError,
        r"input spec '8,x:float32'.*comma-separated.*Fix: write it like",
        mlp,
        "8,x:float32",
    )
    _refused(
        ArgumentValueError,
        r"input spec '8,32:float33': unknown dtype 'float33'.*Fix",
        mlp,
        "8,32:float33",
    )
    _refused(ArgumentValueError, r"input spec '-8,32:float32'", mlp, "-8,32:float32")
    _refused(
        ArgumentTypeError,
        r"the shape must be a sequence of integers.*Fix",
        mlp,
        InputSpec((8, "32")),  # type: ignore[arg-type]
    )
    _refused(ArgumentTypeError, r"the shape must be a sequence of integers", mlp, InputSpec(8))  # type: ignore[arg-type]
    _refused(
        ArgumentTypeError,
        r"the dtype must be a torch.dtype, got str.*Fix",
        mlp,
        InputSpec((8, 32), "float32"),  # type: ignore[arg-type]
    )
    _refused(
        ArgumentValueError, r"the sizes must be non-negative.*Fix", mlp, (InputSpec((-1, 32)),)
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            "99999999999999999999:float32",
            r"size 99999999999999999999 is larger than any tensor dimension",
        ),
        (
            "4611686018427387904,4:float32",
            r"would take 73786976294838206464 bytes, more than a tensor",
        ),
        ("9" * 5000 + ":float32", r"size about 2\*\*\d+ is larger than any tensor dimension"),
        ("8,,16:float32", r"comma-separated non-negative integers"),
        ("8,:float32", r"comma-separated non-negative integers"),
        ("1e3:int64", r"comma-separated non-negative integers"),
        (InputSpec((2**70, 1)), r"size 1180591620717411303424 is larger than any tensor dimension"),
        (InputSpec((2**40, 2**40)), r"more than a tensor can hold"),
        (InputSpec((10**5000,)), r"InputSpec\(<too large to show>\): size about 2\*\*"),
    ],
)
def test_input_specs_larger_than_a_tensor(spec: object, match: str) -> None:
    # each used to escape as torch's RuntimeError or TypeError ("Overflow when unpacking long")
    e = _refused(ArgumentValueError, match + r".*Fix: write it like", mlp, spec)
    assert len(str(e)) < 400  # a long spec is cut, not repeated in full


_SHAPE_LIKE = ("8x16", "2,,4", "2.5,4", "8 16", "-1,16", "(8, 32)", "8,32,")
# these used to reach the forward as text (review of 2026-12-05, fifth session)
_SHAPE_LIKE_TOO = ("8;32", "1e3,32", "8_0,32")
#: text a forward may take (the regression sweeps found the first versions refusing these)
_TEXT = (
    *("e4", "E1", "1/2", "50%", "#1", "1_000", "1e-4", "\u00b2", "\u0663", "v2", "", "a,b"),
    *("0.5;0.25", "1e-4,1e-5", "3.14; 2.71", "-1; -2", "1e,2", "1__0,2"),
    *("\u0668,\u0661\u0666", "\u0668,32"),  # Arabic-Indic digits: sizes are ASCII
)


@pytest.mark.parametrize("spec", _SHAPE_LIKE + _SHAPE_LIKE_TOO)
def test_a_string_that_looks_like_a_shape_is_refused_as_the_cli_refuses_it(spec: str) -> None:
    # it used to reach the forward as text: "the forward of Sequential failed ... not str"
    e = _refused(
        ArgumentValueError,
        r"the shape must be comma-separated non-negative integers\. Fix: write it like",
        mlp,
        spec,
    )
    from lightning_meta._estimate._specs import parse_input_spec

    with pytest.raises(ArgumentValueError) as cli:  # what --input SPEC says
        parse_input_spec(spec)
    assert str(e) == str(cli.value)


def test_a_string_that_is_no_shape_still_reaches_the_forward() -> None:
    class Echo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
            assert mode == "train step"
            return self.fc(x)

    assert estimate(Echo, ("2,4", "train step"), optimizer=None).parameters == 20


def test_input_spec_at_the_limit_is_accepted() -> None:
    from lightning_meta._estimate._specs import parse_input_spec

    assert parse_input_spec("9223372036854775807:bool").shape == (2**63 - 1,)
    assert parse_input_spec(" 8 , 16 :int64") == InputSpec((8, 16), torch.int64)


def test_a_refusal_inside_the_factory_says_that_estimate_built_it_on_meta() -> None:
    def refuses() -> nn.Module:
        raise ArgumentValueError(
            "member 0 holds 'w' on the meta device. Fix: build it normally.", paths=["w"]
        )

    e = _refused(ArgumentValueError, r"^estimate: factory .*refuses", refuses, "8,16")
    text = str(e)
    assert text.count("Fix:") == 1 and ".." not in text, text
    assert "raised ArgumentValueError under torch.device('meta'), where estimate builds it" in text
    assert text.endswith("member 0 holds 'w' on the meta device. Fix: build it normally.")
    assert e.paths == ("w",) and isinstance(e.__cause__, ArgumentValueError)

    def refuses_without_a_fix() -> nn.Module:
        raise MetaTensorError("no members")

    with pytest.raises(MetaTensorError) as info:
        estimate(refuses_without_a_fix, "8,16")
    assert str(info.value).endswith(
        "no members. Fix: make the factory work under torch.device('meta'), or pass a module "
        "built outside it."
    )


def test_no_inputs_is_a_bad_argument() -> None:
    _refused(ArgumentValueError, r"no inputs for Sequential.*--input SHAPE:DTYPE", mlp)


def test_example_inputs_of_a_wrong_type() -> None:
    x = torch.zeros(8, 32)
    _refused(
        ArgumentTypeError,
        r"example_inputs is a module \(Linear\).*Fix: pass the model first",
        mlp,
        nn.Linear(2, 2),
    )
    _refused(
        ArgumentTypeError, r"example_inputs is a set.*Fix: pass a tuple", mlp, {"8,32:float32"}
    )
    _refused(
        ArgumentTypeError,
        r"example_inputs is a generator.*Fix: pass a tuple",
        mlp,
        (t for t in [x]),
    )
    _refused(
        ArgumentTypeError,
        r"keyword names, got 0 \(int\).*Fix: use the parameter names",
        mlp,
        {0: x},
    )


def test_step_failures_stay_meta_tensor_errors() -> None:
    # not a bad argument: the inputs are well-formed but do not fit the model
    with pytest.raises(MetaTensorError, match=r"forward of Sequential in module '0'") as info:
        estimate(mlp, "8,31:float32")
    assert not isinstance(info.value, (TypeError, ValueError))


# ---------------------------------------------------------------- the phases, one at a time


def test_resolve_options() -> None:
    options = resolve_options(
        loss_fn=None,
        optimizer="adam",
        precision="bf16-true",
        device="cpu",
        depth=1,
        loop="plain",
        extrapolate=False,
    )
    assert options.device == torch.device("cpu")
    assert options.precision.cast_to is torch.bfloat16
    assert options.optimizer_name == "adam"
    assert options.zero_grad_before_forward
    assert (options.depth, options.extrapolate, options.loss_fn) == (1, False, None)


def test_inputs_of_turns_specs_into_meta_tensors() -> None:
    x = torch.zeros(2, 3)
    args, kwargs = inputs_of(nn.Linear(3, 3), (x, "4,3:int64", [InputSpec((5,))], None))
    assert args[0] is x
    assert args[1].is_meta and args[1].shape == (4, 3) and args[1].dtype == torch.int64
    assert args[2][0].is_meta and args[2][0].shape == (5,)
    assert args[3] is None and kwargs == {}
    _, kwargs = inputs_of(nn.Linear(3, 3), {"x": "2,3:float32"})
    assert kwargs["x"].shape == (2, 3)


def test_fake_state_keeps_tied_weights_tied() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model.register_buffer("steps", torch.zeros((), dtype=torch.int64))
    for mode, device in ((FakeTensorMode(allow_non_fake_inputs=True), "cpu"), (None, "meta")):
        state = fake_state(model, mode, torch.device(device), torch.float16)
        assert state["0.weight"] is state["1.weight"]
        assert isinstance(state["0.weight"], nn.Parameter)
        assert state["0.weight"].dtype == torch.float16
        assert state["steps"].dtype == torch.int64  # integers are not cast
        assert all(t.device.type == device for t in state.values())
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model is untouched


def test_prepare_optimizer_creates_the_steady_state() -> None:
    module = mlp()
    options = resolve_options(
        loss_fn=None,
        optimizer="adamw",
        precision="32-true",
        device="cpu",
        depth=2,
        loop="lightning",
        extrapolate=True,
    )
    fake = fake_step(module, *inputs_of(module, "8,32:float32"), options)
    params = trainable_parameters(fake.state)
    optimizer = prepare_optimizer(
        params,
        mode=fake.mode,
        device=options.device,
        optimizer_factory=options.optimizer_factory,
        zero_grad_before_forward=False,
    )
    assert optimizer is not None
    assert len(optimizer.state) == len(params) == 4
    assert all(p.grad is not None for p in params)  # last step's gradients are alive


def test_the_phases_compose_to_estimate() -> None:
    module = mlp()
    options = resolve_options(
        loss_fn=None,
        optimizer="sgd",
        precision="32-true",
        device="cpu",
        depth=2,
        loop="lightning",
        extrapolate=True,
    )
    args, kwargs = inputs_of(module, "8,32:float32")
    state, record = run_step(module, args, kwargs, options)
    assert record.stage == "done" and record.forward_flops[""] == 2 * 8 * (32 * 64 + 64 * 10)
    result = assemble(
        module,
        state,
        record,
        depth=2,
        optimizer="sgd",
        precision="32-true",
        device=options.device,
        method="full step",
    )
    assert result == estimate(mlp, "8,32:float32", optimizer="sgd")
    assert simulate(module, args, kwargs, options)[2] == "full step"


class _Modal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        assert isinstance(mode, str)
        out: torch.Tensor = self.fc(x)
        return out


@pytest.mark.parametrize("text", _TEXT)
def test_a_string_that_is_not_a_shape_reaches_the_forward_as_text(text: str) -> None:
    assert estimate(_Modal, ("2,4", text), optimizer=None).forward_flops > 0
