"""Per-rank estimates: layouts, strategies, what fits, the command line and bad combinations.

The comparisons with real multi-process runs are in
``test_estimate_ranks_measured.py`` (slow); these run in one process.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_meta import MetaTensorError, estimate
from lightning_meta._cli import main
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError
from lightning_meta._estimate._fit import find_fit, parse_bytes
from lightning_meta._estimate._layout import shard_rows
from lightning_meta._estimate._track import CATEGORIES
from support.measure_estimate_ranks import PLAN, TinyLM, first_loss
from support.zoo_models import LLAMA_HF_CONFIG as LLAMA

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM

# The CPU flash attention's scratch is only bounded (a MetaTensorWarning when the
# bound could exceed the peak; tests/estimate/test_estimate_memory.py checks it);
# these tests check each rank's peak against real runs or relations between estimates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:estimate. peak_bytes of .* may be too low by up to:lightning_meta.MetaTensorWarning"
)

TOKENS = "4,64:int64"


def llama(layers: int = 2, heads: int = 4, kv_heads: int = 2) -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=256,
        )
    )


def tiny(**options: Any) -> Any:
    return estimate(TinyLM, TOKENS, loss_fn=first_loss, **options)


# ---------------------------------------------------------------- one process is unchanged


def test_without_a_strategy_the_result_has_no_rank_and_the_usual_categories() -> None:
    est = tiny()
    assert est.rank is None
    assert "rank" not in est.to_dict()
    assert tuple(est.peak_breakdown) == CATEGORIES


# ---------------------------------------------------------------- DDP


def test_ddp_adds_gradient_buckets_to_the_single_process_step() -> None:
    single = tiny()
    ddp = tiny(strategy="ddp", world_size=8)
    assert ddp.peak_bytes == single.peak_bytes + single.gradient_bytes
    assert ddp.peak_breakdown["communication"] == single.gradient_bytes
    assert (ddp.forward_flops, ddp.backward_flops) == (single.forward_flops, single.backward_flops)
    assert ddp.rank is not None
    assert ddp.rank.parameter_bytes == ddp.parameter_bytes == single.parameter_bytes
    # gradients as views into the buckets: no second copy
    views = tiny(strategy="ddp", world_size=8, gradient_as_bucket_view=True)
    assert views.peak_bytes < ddp.peak_bytes
    assert views.peak_breakdown["communication"] == 0


# ---------------------------------------------------------------- FSDP2


def test_fsdp_holds_the_padded_dim0_shard_of_every_parameter() -> None:
    est = tiny(strategy="fsdp", world_size=3)  # 3 ranks: rows are padded
    expected = sum(
        shard_rows(p.shape[0], 3) * math.prod(p.shape[1:]) for p in TinyLM().parameters()
    )
    assert est.rank is not None
    assert est.rank.parameters == expected
    assert est.rank.parameter_bytes == 4 * expected
    assert est.parameters == sum(p.numel() for p in TinyLM().parameters())
    # AdamW: two moments and a step per shard; gradients: the shards' size
    assert est.optimizer_state_bytes == 2 * 4 * expected + 4 * len(list(TinyLM().parameters()))
    assert est.gradient_bytes == 4 * expected
    assert est.peak_breakdown["communication"] >= 0
    assert sum(est.peak_breakdown.values()) == est.peak_bytes


def test_fsdp_per_rank_memory_falls_with_ranks_and_flops_follow_the_rank_batch() -> None:
    peaks = [tiny(strategy="fsdp", world_size=w).peak_bytes for w in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
    single = tiny()
    sharded = tiny(strategy="fsdp", world_size=4)
    assert sharded.forward_flops == single.forward_flops
    assert sharded.rank is not None and sharded.rank.forward_flops == single.forward_flops


def test_fsdp_options_change_what_they_should() -> None:
    base = tiny(strategy="fsdp", world_size=4)
    kept = tiny(strategy="fsdp", world_size=4, reshard_after_forward=False)
    checkpointed = tiny(strategy="fsdp", world_size=4, activation_checkpointing=True)
    mixed = tiny(strategy="fsdp", world_size=4, mixed_precision="bf16")
    assert kept.peak_bytes > base.peak_bytes
    assert checkpointed.activation_bytes < base.activation_bytes
    assert checkpointed.backward_flops > base.backward_flops  # the recomputation
    assert checkpointed.forward_flops == base.forward_flops
    assert mixed.peak_bytes < base.peak_bytes
    assert mixed.rank is not None
    assert (mixed.rank.param_dtype, mixed.rank.reduce_dtype) == ("bfloat16", "float32")
    assert mixed.rank.parameter_bytes == base.rank.parameter_bytes  # type: ignore[union-attr]
    gloo = tiny(strategy="fsdp", world_size=4, backend="gloo")
    assert gloo.peak_bytes > base.peak_bytes  # gloo stages a copy of each collective


def test_fsdp_on_a_transformers_model_with_checkpointing_drops_the_cache() -> None:
    # a KV cache appended to in forward would grow again when recomputed
    plain = estimate(llama, TOKENS, strategy="fsdp", world_size=2)
    checkpointed = estimate(
        llama, TOKENS, strategy="fsdp", world_size=2, activation_checkpointing=True
    )
    assert checkpointed.activation_bytes < plain.activation_bytes
    assert checkpointed.rank is not None and checkpointed.rank.blocks == 2


def test_a_strategy_step_extrapolates_exactly() -> None:
    deep = lambda: llama(layers=10)  # noqa: E731
    options: dict[str, Any] = dict(
        strategy="fsdp",
        world_size=8,
        tensor_parallel=2,
        activation_checkpointing=True,
        mixed_precision="bf16",
        depth=3,
    )
    fast = estimate(deep, "2,32:int64", **options)
    full = estimate(deep, "2,32:int64", extrapolate=False, **options)
    assert "extrapolated exactly from steps with 3, 4, 5" in fast.method
    a, b = fast.to_dict(), full.to_dict()
    a.pop("method"), b.pop("method")
    assert a == b


# ---------------------------------------------------------------- tensor parallel


def test_tensor_parallel_splits_the_planned_layers() -> None:
    single = tiny(depth=4)
    est = tiny(strategy="fsdp", world_size=4, tensor_parallel=2, tensor_parallel_plan=PLAN)
    assert est.rank is not None
    assert est.rank.tensor_parallel_layers == 7 * 4
    assert (est.rank.data_parallel_size, est.rank.tensor_parallel_size) == (2, 2)
    rows = {m.name: m for m in single.modules}
    split = sum(
        m.forward_flops
        for m in single.modules
        if any(m.name.endswith(k.split("*")[-1]) for k in PLAN)
    )
    assert split > 0
    # attention runs on the rank's local heads, plain tensors: FlopCounterMode
    # counts it (torch >= 2.15 has a formula for the CPU kernel; before, it is
    # 0 and in uncounted_forward_flops) at the rank's size, half of it
    attention = sum(
        rows[f"blocks.{i}.attn"].forward_flops
        - sum(rows[f"blocks.{i}.attn.{p}"].forward_flops for p in "qkvo")
        for i in range(4)
    )
    assert est.uncounted_forward_flops == single.uncounted_forward_flops // 2
    # FlopCounterMode counts a split layer's DTensor ops at their full size ...
    assert est.forward_flops == single.forward_flops - attention // 2
    # ... while the rank computes half of each split layer's matmuls
    assert est.rank.forward_flops == single.forward_flops - split // 2 - attention // 2


def planned(model: nn.Module) -> int:
    """How many modules of ``model`` its transformers ``tp_plan`` splits (``*`` for any index)."""
    plan = [re.compile(re.escape(k).replace(r"\*", r"\d+") + "$") for k in model.tp_plan]
    return sum(1 for n, _ in model.named_modules() if n and any(p.match(n) for p in plan))


def test_transformers_plan_is_used_by_default() -> None:
    est = estimate(llama, TOKENS, strategy="fsdp", world_size=4, tensor_parallel=2)
    assert est.rank is not None
    # transformers' model.tp_plan, what from_pretrained(tp_plan="auto") applies: q, k, v, o,
    # gate, up, down per layer (transformers 5.3; newer ones also split the embedding and head)
    assert est.rank.tensor_parallel_layers == planned(llama()) >= 7 * 2


def _head(split: bool) -> Callable[[], nn.Module]:
    from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES

    # the head's style has another name in transformers 4.x
    style = (
        "colwise_gather_output" if "colwise_gather_output" in ALL_PARALLEL_STYLES else "colwise_rep"
    )

    def build() -> nn.Module:
        model = llama()
        plan = {k: v for k, v in model.tp_plan.items() if k != "lm_head"}
        model.tp_plan = {**plan, "lm_head": style} if split else plan  # type: ignore
        return model

    return build


def test_the_model_tp_plan_transformers_applies_is_the_default() -> None:
    est = estimate(_head(True), TOKENS, strategy="fsdp", world_size=4, tensor_parallel=2)
    plain = estimate(_head(False), TOKENS, strategy="fsdp", world_size=4, tensor_parallel=2)
    assert est.rank is not None and plain.rank is not None
    assert est.rank.tensor_parallel_layers == plain.rank.tensor_parallel_layers + 1
    # the head's weight (256 x 64) is split over the 2 tensor ranks, then FSDP2 shards
    # each half over the 2 data-parallel ranks
    assert plain.rank.parameters - est.rank.parameters == 256 * 64 // 2 // 2


def test_a_plan_for_a_model_without_submodules_names_the_fix() -> None:
    with pytest.raises(
        ArgumentValueError,
        match=r"entry 'x' matches no module of Linear, which has no submodules.*Fix: leave tensor_parallel",
    ):
        estimate(lambda: nn.Linear(8, 8), "8:float32", strategy="fsdp", world_size=2,
                 tensor_parallel=2, tensor_parallel_plan={"x": "colwise"})  # fmt: skip


# ---------------------------------------------------------------- bad combinations


@pytest.mark.parametrize(
    ("options", "kind", "message"),
    [
        (
            {"strategy": "fsdp", "world_size": 6, "tensor_parallel": 4},
            ArgumentValueError,
            r"world_size=6 cannot be divided.*multiple of 4 \(such as 4 or 8\), or a "
            r"tensor_parallel that divides 6 \(1, 2, 3, 6\)",
        ),
        (
            {"strategy": "fsdp", "world_size": 2, "tensor_parallel": 4},
            ArgumentValueError,
            r"world_size=2 cannot be divided.*multiple of 4 \(such as 4\), or a "
            r"tensor_parallel that divides 2 \(1, 2\)",
        ),
        (
            {"strategy": "fsdp", "world_size": 12, "tensor_parallel": 3},
            ArgumentValueError,
            r"tensor_parallel=3 does not divide config.num_attention_heads=4.*\(1, 2, 4\)",
        ),
        (
            {"strategy": "fsdp", "world_size": 8, "tensor_parallel": 4},
            ArgumentValueError,
            r"tensor_parallel=4 does not divide config.num_key_value_heads=2",
        ),
        (
            {"strategy": "ddp", "world_size": 8, "tensor_parallel": 2},
            ArgumentValueError,
            r"tensor_parallel does not apply to DDP.*strategy='fsdp'",
        ),
        ({"world_size": 8}, ArgumentValueError, r"world_size given without a strategy"),
        ({"strategy": "zero3", "world_size": 8}, ArgumentValueError, r"unknown strategy 'zero3'"),
        ({"strategy": "fsdp"}, ArgumentValueError, r"needs world_size"),
        ({"strategy": "fsdp", "world_size": 0}, ArgumentValueError, r"world_size must be >= 1"),
        ({"strategy": "fsdp", "world_size": 2.5}, ArgumentTypeError, r"world_size must be an int"),
        (
            {"strategy": "fsdp", "world_size": 2, "mixed_precision": "int8"},
            ArgumentValueError,
            r"mixed_precision dtype torch.int8 is not floating point",
        ),
        (
            {"strategy": "fsdp", "world_size": 2, "backend": "mpi"},
            ArgumentValueError,
            r"unknown backend 'mpi'",
        ),
        (
            {"strategy": "ddp", "world_size": 2, "reshard_after_forward": False},
            ArgumentValueError,
            r"reshard_after_forward does not apply to DDP",
        ),
        (
            {"strategy": "fsdp", "world_size": 2, "gradient_as_bucket_view": True},
            ArgumentValueError,
            r"gradient_as_bucket_view is a DDP option",
        ),
    ],
)
def test_bad_combinations_name_the_fix(
    options: dict[str, Any], kind: type[Exception], message: str
) -> None:
    with pytest.raises(kind, match=message):
        estimate(llama, TOKENS, **options)


def test_bad_plans_name_the_fix() -> None:
    with pytest.raises(ArgumentValueError, match=r"entry 'blocks.\*.attn.qq' matches no module"):
        tiny(
            strategy="fsdp",
            world_size=2,
            tensor_parallel=2,
            tensor_parallel_plan={"blocks.*.attn.qq": "colwise"},
        )
    with pytest.raises(ArgumentValueError, match=r"style 'sequence_parallel'.*does not simulate"):
        tiny(
            strategy="fsdp",
            world_size=2,
            tensor_parallel=2,
            tensor_parallel_plan={"norm": "sequence_parallel"},
        )
    with pytest.raises(ArgumentValueError, match=r"splits 'blocks.0.norm1', a LayerNorm"):
        tiny(
            strategy="fsdp",
            world_size=2,
            tensor_parallel=2,
            tensor_parallel_plan={"blocks.0.norm1": "colwise"},
        )
    with pytest.raises(
        ArgumentValueError,
        match=r"tensor_parallel=3 does not divide dim 0 \(256\) of blocks.0.attn.q.weight",
    ):
        tiny(
            strategy="fsdp",
            world_size=3,
            tensor_parallel=3,
            tensor_parallel_plan={"blocks.0.attn.q": "colwise"},
        )
    with pytest.raises(
        ArgumentValueError,
        match=r"needs a plan.*no transformers tp_plan or config.base_model_tp_plan",
    ):
        tiny(strategy="fsdp", world_size=2, tensor_parallel=2)


def test_no_blocks_to_checkpoint_names_the_fix() -> None:
    with pytest.raises(ArgumentValueError, match=r"found no blocks to checkpoint.*blocks="):
        estimate(
            lambda: nn.Linear(8, 8),
            "2,8:float32",
            strategy="fsdp",
            world_size=2,
            activation_checkpointing=True,
        )
    with pytest.raises(ArgumentValueError, match=r"blocks='layers' is not a submodule"):
        tiny(strategy="fsdp", world_size=2, blocks="layers")


def test_a_model_that_is_not_tensor_parallel_ready_gets_the_fix() -> None:
    class Fixed(nn.Module):
        """Reshapes with the whole model's head count: wrong on a rank's slice."""

        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.o = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.o(self.q(x).view(2, 4, 4, 4).reshape(2, 4, 16))
            return out

    with pytest.raises(MetaTensorError, match=r"must reshape with -1 \(its local head count\)"):
        estimate(Fixed, "2,4,16:float32", strategy="fsdp", world_size=2, tensor_parallel=2,
                 tensor_parallel_plan={"q": "colwise", "o": "rowwise"})  # fmt: skip


# ---------------------------------------------------------------- what fits


def test_parse_bytes() -> None:
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("80 GB") == 80 * 10**9
    assert parse_bytes(1024) == 1024
    with pytest.raises(ArgumentValueError, match=r"memory='80 gigs' does not parse"):
        parse_bytes("80 gigs")
    with pytest.raises(ArgumentValueError, match=r"not a positive size"):
        parse_bytes(0)
    with pytest.raises(ArgumentTypeError, match=r"is not a size"):
        parse_bytes([80])


@pytest.mark.parametrize("vary", ["batch", "sequence"])
def test_the_largest_batch_or_sequence_is_the_boundary(vary: str) -> None:
    budget = tiny(strategy="fsdp", world_size=4).peak_bytes * 2
    answer = find_fit(
        TinyLM, TOKENS, memory=budget, vary=vary, loss_fn=first_loss, strategy="fsdp", world_size=4
    )  # type: ignore[arg-type]
    assert answer.value is not None and answer.fits is not None and answer.beyond is not None
    assert answer.fits.peak_bytes <= budget < answer.beyond.peak_bytes
    size = answer.value
    shape = f"{size},64:int64" if vary == "batch" else f"4,{size}:int64"
    assert tiny(strategy="fsdp", world_size=4).peak_bytes < answer.fits.peak_bytes
    assert (
        estimate(TinyLM, shape, loss_fn=first_loss, strategy="fsdp", world_size=4).peak_bytes
        == answer.fits.peak_bytes
    )
    assert answer.estimates <= 12
    assert json.loads(json.dumps(answer.to_dict()))["value"] == size


class Attention(nn.Module):
    """Scores over every pair of tokens: the peak is quadratic in the sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        scores = (h @ h.transpose(1, 2)).softmax(-1)
        out: torch.Tensor = self.out(scores @ h).sum()
        return out


def test_a_quadratic_peak_is_found_in_logarithmically_many_estimates() -> None:
    budget = estimate(Attention, "1,3000:int64").peak_bytes
    limit = 2**16
    answer = find_fit(Attention, "1,64:int64", memory=budget, vary="sequence", limit=limit)
    assert answer.value == 3000
    assert answer.fits is not None and answer.beyond is not None
    assert answer.fits.peak_bytes <= budget < answer.beyond.peak_bytes
    # straight-line steps alone crawl along a curve (hundreds of estimates); the guard bounds them
    assert answer.estimates <= 2 * math.log2(limit) + 4


def test_the_smallest_world_size_is_the_boundary() -> None:
    budget = tiny(strategy="fsdp", world_size=8).peak_bytes
    answer = find_fit(
        TinyLM, TOKENS, memory=budget, vary="world_size", loss_fn=first_loss, strategy="fsdp"
    )
    assert answer.value is not None and answer.value <= 8
    assert answer.fits is not None and answer.fits.peak_bytes <= budget
    assert answer.beyond is not None and answer.beyond.peak_bytes > budget
    # a global batch: every rank's batch shrinks as ranks are added
    kept = find_fit(
        TinyLM,
        TOKENS,
        memory=budget,
        vary="world_size",
        global_batch=32,
        loss_fn=first_loss,
        strategy="fsdp",
    )
    assert kept.value is not None and 32 % kept.value == 0


def test_fit_refuses_what_cannot_be_searched() -> None:
    with pytest.raises(ArgumentValueError, match=r"vary='world_size' needs strategy='fsdp'"):
        find_fit(TinyLM, TOKENS, memory="1GiB", vary="world_size", strategy="ddp")
    with pytest.raises(ArgumentValueError, match=r"unknown vary='depth'"):
        find_fit(TinyLM, TOKENS, memory="1GiB", vary="depth")  # type: ignore[arg-type]
    with pytest.raises(ArgumentValueError, match=r"searches world_size itself"):
        find_fit(TinyLM, TOKENS, memory="1GiB", vary="world_size", strategy="fsdp", world_size=8)
    with pytest.raises(ArgumentValueError, match=r"has no sequence \(dim 1\)"):
        find_fit(lambda: nn.Linear(8, 8), "8:float32", memory="1GiB", vary="sequence")
    nothing = find_fit(TinyLM, TOKENS, memory="1MiB", loss_fn=first_loss)
    assert nothing.value is None and nothing.fits is None and nothing.beyond is not None


# ---------------------------------------------------------------- command line


def test_cli_json_carries_the_rank(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "--hf-config", json.dumps(LLAMA), "--input", TOKENS, "--json"]
    rank = ["--strategy", "fsdp", "--world-size", "8", "--tensor-parallel", "2",
            "--activation-checkpointing", "--mixed-precision", "bf16"]  # fmt: skip
    assert main([*argv, *rank]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rank"] == {
        **doc["rank"],
        "strategy": "fsdp",
        "world_size": 8,
        "data_parallel_size": 4,
        "tensor_parallel_size": 2,
        "activation_checkpointing": True,
        "param_dtype": "bfloat16",
        "reduce_dtype": "float32",
        "blocks": 2,
        "tensor_parallel_layers": planned(llama()),
    }
    for key in ("parameters", "parameter_bytes", "forward_flops", "backward_flops"):
        assert doc["rank"][key] > 0
    assert doc["peak_breakdown"]["communication"] >= 0
    expected = estimate(llama, TOKENS, strategy="fsdp", world_size=8, tensor_parallel=2,
                        activation_checkpointing=True, mixed_precision="bf16")  # fmt: skip
    assert doc["peak_bytes"] == expected.peak_bytes


def test_cli_fit(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "--hf-config", json.dumps(LLAMA), "--input", TOKENS, "--strategy", "fsdp",
            "--world-size", "4", "--memory", "64MiB", "--fit", "batch"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["vary"] == "batch" and doc["value"] > 0
    assert doc["fits_peak_bytes"] <= 64 * 2**20 < doc["beyond_peak_bytes"]
    assert doc["fits"]["rank"]["world_size"] == 4
    assert main(argv) == 0
    assert "largest batch within 64.00 MiB per device" in capsys.readouterr().out


def test_cli_fit_exits_1_when_even_one_sample_does_not_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["estimate", "--hf-config", json.dumps(LLAMA), "--input", TOKENS, "--strategy", "fsdp",
            "--world-size", "4", "--memory", "64KiB", "--fit", "batch"]  # fmt: skip
    assert main([*argv, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["value"] is None and doc["beyond_peak_bytes"] > 64 * 2**10
    assert main(argv) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "largest batch within 64.00 KiB per device: none: even 1 does not fit in 64.00 KiB" in out
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--strategy", "fsdp", "--world-size", "6", "--tensor-parallel", "4"],
            "is not a multiple of 4",
        ),
        (
            ["--strategy", "fsdp", "--world-size", "8", "--tensor-parallel", "8"],
            "does not divide config.num_attention_heads=4",
        ),
        (["--world-size", "8"], "given without a strategy"),
        (
            ["--strategy", "fsdp", "--world-size", "2", "--memory", "80GiB"],
            "--memory and --fit go together",
        ),
        (
            ["--strategy", "ddp", "--world-size", "2", "--memory", "80GiB", "--fit", "world-size"],
            "needs --strategy fsdp",
        ),
        (
            ["--strategy", "fsdp", "--world-size", "2", "--tensor-parallel-plan", "{nope"],
            "is neither JSON",
        ),
        (
            ["--strategy", "fsdp", "--world-size", "2", "--memory", "lots", "--fit", "batch"],
            "does not parse",
        ),
    ],
)
def test_cli_bad_combinations_exit_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["estimate", "--hf-config", json.dumps(LLAMA), "--input", TOKENS, "--json", *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err
