"""transformers' own branches on fake tensors (2026-12-07, sixth session): its
``is_tracing(tensor)`` is true for any ``FakeTensor``, so ``estimate`` simulated
``torch.export``'s path, not the real run's: an all-ones ``attention_mask`` built a full
4-D mask where the real run passes ``is_causal`` (19 % over on Llama and BERT, and
``find_fit`` answered 642 where 981 fit), Mamba's default config its associative scan
where a real CPU run loops (48 % over). Measured against real steps.

``find_fit(vary="sequence")`` over a transformers model with absolute positions
(2026-12-07, sixth session). BERT slices a buffer of ``config.max_position_embeddings``
position ids: a longer sequence fails in its own code on a shape, not by index, and the
search failed ("at 1048576 the model refuses them") instead of answering the model's
length. A refusal above the config's length now bounds the search when the answer is
that length exactly; a model whose rotary positions run past it (Llama) is not bounded
there, and a refusal that is no such bound stays an error."""

from __future__ import annotations

import warnings

import pytest
import torch

from cli.test_cli_review20 import _Squares
from lightning_meta import MetaTensorError, MetaTensorWarning, estimate, find_fit
from support.measure import measure_training_step

transformers = pytest.importorskip("transformers")


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=48,
    )  # fmt: skip
    return transformers.BertModel(config)


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=48,
    )  # fmt: skip
    return transformers.LlamaModel(config)


def test_bert_is_bounded_by_its_configs_positions() -> None:
    ids = {"input_ids": torch.ones(1, 8, dtype=torch.long)}
    # the real model: 48 runs, 49 fails on the position ids' shape
    model = _bert()
    model(input_ids=torch.ones(1, 48, dtype=torch.long))
    with pytest.raises(RuntimeError, match="size"):
        model(input_ids=torch.ones(1, 49, dtype=torch.long))
    fit = find_fit(_bert, ids, memory="1GiB", vary="sequence")
    assert fit.value == 48 and not fit.at_limit
    assert fit.refused.startswith("longer than BertModel.config.max_position_embeddings (48): ")
    # memory below the positions still bounds the answer, with no refusal named
    small = estimate(_bert, {"input_ids": torch.ones(1, 40, dtype=torch.long)}).peak_bytes
    fit = find_fit(_bert, ids, memory=small, vary="sequence")
    assert fit.value is not None and 40 <= fit.value < 48 and fit.refused == ""


def test_rotary_positions_run_past_the_configs_length() -> None:
    _llama()(input_ids=torch.ones(1, 97, dtype=torch.long))
    fit = find_fit(_llama, {"input_ids": torch.ones(1, 8, dtype=torch.long)},
                   memory="8MiB", vary="sequence")  # fmt: skip
    assert fit.value is not None and fit.value > 48 and fit.refused == ""


class _Config:
    max_position_embeddings = 16


class _SquaresWithConfig(_Squares):
    """Square token grids, and a config whose length is no bound: 49 runs."""

    config = _Config()


class _Multiples(_SquaresWithConfig):
    """Past the config's length, only its multiples, refused in words that name the length:
    no bound either (32 runs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > 16 and x.size(1) % 16:
            raise ValueError(f"length {x.size(1)} is not a multiple of 16")
        out: torch.Tensor = self.lin(x)
        return out


def test_a_refusal_that_is_not_the_configs_length_stays_an_error() -> None:
    _SquaresWithConfig()(torch.zeros(1, 49, 4))
    with pytest.raises(MetaTensorError, match="the model refuses them.*AssertionError"):
        find_fit(_SquaresWithConfig, "1,16,4", memory="4MiB", vary="sequence")
    _Multiples()(torch.zeros(1, 32, 4))
    with pytest.raises(MetaTensorError, match="the model refuses them.*not a multiple of 16"):
        find_fit(_Multiples, "1,16,4", memory="4MiB", vary="sequence")


def _causal_lm(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mamba":
        config = transformers.MambaConfig(
            vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
            conv_kernel=4,
        )  # fmt: skip
        return transformers.MambaForCausalLM(config).train()
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).train()


@pytest.mark.filterwarnings("ignore:.*CPU kernels allocate scratch memory")
@pytest.mark.parametrize(
    ("kind", "with_mask"), [("llama", True), ("llama", False), ("mamba", False)]
)  # fmt: skip
def test_the_estimate_takes_the_real_runs_branches(kind: str, with_mask: bool) -> None:
    ids = torch.randint(0, 64, (1, 128), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    if with_mask:  # what a collator gives unpadded or packed data
        inputs["attention_mask"] = torch.ones_like(ids)
    estimated = estimate(lambda: _causal_lm(kind), inputs).peak_bytes
    measured = measure_training_step(_causal_lm(kind), (), inputs).peak_bytes
    assert estimated == measured


def test_transformers_is_left_as_it_was() -> None:
    utils = pytest.importorskip("transformers.utils.import_utils")
    before = getattr(utils, "is_fake_tensor", None)  # transformers 4.57 has none
    estimate(lambda: _causal_lm("llama"), {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    with pytest.raises(MetaTensorError):
        estimate(lambda: _causal_lm("llama"), {"input_ids": torch.full((1, 8), 64)})
    assert getattr(utils, "is_fake_tensor", None) is before
    if before is not None:
        # a fake of anyone else's mode is still one to transformers
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            assert utils.is_tracing(torch.empty(2))


def test_a_routed_mixture_of_experts_is_named_in_the_refusal() -> None:
    # litgpt's LLaMAMoE gathers each expert's tokens by the router's choice; the fix
    # spoke of LayerDrop, CTC and PackedSequence only (2026-12-07, sixth session)
    litgpt = pytest.importorskip("litgpt")

    def tiny_moe() -> torch.nn.Module:
        config = litgpt.Config(
            block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16, n_query_groups=2,
            mlp_class_name="LLaMAMoE", moe_intermediate_size=16, intermediate_size=16,
            n_expert=4, n_expert_per_token=2,
        )  # fmt: skip
        return litgpt.GPT(config)

    tiny_moe()(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(MetaTensorError, match="as litgpt's LLaMAMoE does"):
        estimate(tiny_moe, "1,8:int64")


@pytest.mark.filterwarnings("ignore:.*CPU kernels allocate scratch memory")
def test_find_fit_keeps_an_all_ones_mask_when_it_resizes_the_inputs() -> None:
    # the search resizes its inputs as meta tensors, which read as zeros: a mask of
    # ones became one of zeros (all padding), and the 4-D mask path answered 642 where
    # 981 fit (the review's model; this one is smaller)
    def at(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def peak(n: int) -> int:
        return measure_training_step(_causal_lm("llama"), (), at(n)).peak_bytes

    budget = peak(200)
    fit = find_fit(lambda: _causal_lm("llama"), at(16), memory=budget, vary="sequence")
    assert fit.value is not None
    assert peak(fit.value) <= budget < peak(fit.value + 1)


@pytest.mark.filterwarnings("ignore:.*CPU kernels allocate scratch memory")
def test_a_mask_too_large_to_follow_keeps_the_export_path_not_a_refusal() -> None:
    # the second look: over MAX_ELEMENTS the estimate follows no values, and the real
    # branch reads mask.all(): refused, where the export path had estimated (over)
    utils = pytest.importorskip("transformers.utils.import_utils")
    if not hasattr(utils, "is_fake_tensor"):
        pytest.skip("transformers 4.57 has no export path for fakes: it reads the mask")
    ids = torch.ones(1, (1 << 20) + 1, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert estimate(lambda: _causal_lm("llama"), inputs, optimizer="sgd").peak_bytes > 0


class _Wrapper(torch.nn.Module):
    """A LightningModule's way of holding the model: its config one level down."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _bert()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(input_ids=input_ids).last_hidden_state
        return out


class _EndsInFive(torch.nn.Module):
    """Past its config's length only lengths ending in 5, refused in its own words naming
    the length: 55 runs, so 48 is no bound (the second look's model)."""

    config = transformers.BertConfig(max_position_embeddings=48)

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.size(1)
        if n > 48 and n % 10 != 5:
            raise ValueError(f"past max_position_embeddings=48 the length must end in 5: {n}")
        out: torch.Tensor = self.lin(torch.ones(1, n, 4))
        return out


def test_the_configs_length_of_a_held_model_bounds_the_search() -> None:
    fit = find_fit(_Wrapper, {"input_ids": torch.ones(1, 8, dtype=torch.long)}, memory="1GiB",
                   vary="sequence")  # fmt: skip
    assert fit.value == 48
    assert fit.refused.startswith("longer than _Wrapper.model.config.max_position_embeddings (48)")


def test_a_rule_of_the_models_own_naming_the_length_is_no_bound() -> None:
    # a first version took it for one: 48 answered where 55 runs
    _EndsInFive()(torch.ones(1, 55, dtype=torch.long))
    with pytest.raises(MetaTensorError, match="the model refuses them"):
        find_fit(_EndsInFive, {"input_ids": torch.ones(1, 8, dtype=torch.long)},
                 memory="64KiB", vary="sequence")  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*CPU kernels allocate scratch memory")
def test_find_fit_keeps_counting_position_ids_when_it_resizes_the_inputs() -> None:
    # the third look: arange position_ids resized as zeros read as packed sequences in
    # transformers (use_cache=False), whose 4-D mask answered 124 where 150 fit
    def model() -> torch.nn.Module:
        llama = _causal_lm("llama")
        llama.config.use_cache = False
        return llama

    def at(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n))
        return {"input_ids": ids, "position_ids": torch.arange(n)[None], "labels": ids}

    def peak(n: int) -> int:
        return measure_training_step(model(), (), at(n)).peak_bytes

    budget = peak(150)
    fit = find_fit(model, at(16), memory=budget, vary="sequence")
    assert fit.value is not None
    assert peak(fit.value) <= budget < peak(fit.value + 1)
    assert fit.fits is not None and fit.fits.inputs_read_as_zeros == ()


def test_find_fit_warns_of_its_answers_estimate_only() -> None:
    # a search of 11 estimates printed the CPU flash attention's scratch warning 11
    # times, each with another bound; the answer's is the one that applies
    ids = {"input_ids": torch.ones(1, 16, dtype=torch.long)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = find_fit(lambda: _causal_lm("llama"), ids, memory="2MiB", vary="sequence")
    said = [str(w.message) for w in caught if issubclass(w.category, MetaTensorWarning)]
    assert fit.value is not None and fit.estimates > 3
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        estimate(
            lambda: _causal_lm("llama"), {"input_ids": torch.ones(1, fit.value, dtype=torch.long)}
        )
    assert said == [str(w.message) for w in again if issubclass(w.category, MetaTensorWarning)]
    assert len(said) == 1
