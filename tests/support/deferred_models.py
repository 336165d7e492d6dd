"""Tiny fixture models for the deferred-init tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

import lightning_meta as lm


def assert_like_eager(build: Callable[..., nn.Module], *args: object) -> nn.Module:
    """Build with the same seed eagerly and in a ``deferred_init`` block, materialize, and
    assert what eager construction gives: every tensor of ``state_dict`` equal, the global
    generator where eager leaves it, and the same ``seen`` attribute (what ``__init__``
    observed, if it keeps that). Returns the deferred model."""
    torch.manual_seed(0)
    eager = build(*args)
    after_eager = torch.get_rng_state()
    torch.manual_seed(0)
    with lm.deferred_init():
        deferred = build(*args)
    lm.materialize(deferred)
    assert torch.equal(torch.get_rng_state(), after_eager)
    mine, theirs = deferred.state_dict(), eager.state_dict()
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name
    assert vars(deferred).get("seen") == vars(eager).get("seen")
    return deferred


class Custom(nn.Module):
    """Raw parameters, arithmetic on recorded tensors and a non-persistent buffer."""

    def __init__(self, captured: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4, 8) * 0.02)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.register_buffer("pos", torch.arange(16).float() ** 2, persistent=False)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
        if captured is not None:
            self.register_buffer("shifted", captured * 2 + torch.ones(3))


class _Attention(nn.Module):
    def __init__(self, n_embd: int, block_size: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        self.register_buffer("bias", mask, persistent=False)


class _Block(nn.Module):
    def __init__(self, n_embd: int, block_size: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = _Attention(n_embd, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.ModuleDict(
            {"c_fc": nn.Linear(n_embd, 4 * n_embd), "c_proj": nn.Linear(4 * n_embd, n_embd)}
        )


class NanoGPT(nn.Module):
    """nanoGPT's init: parent-level apply, scaled projections, tied embedding and head."""

    def __init__(
        self, vocab: int = 64, n_embd: int = 16, n_layer: int = 2, block_size: int = 8
    ) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, n_embd),
                "wpe": nn.Embedding(block_size, n_embd),
                "h": nn.ModuleList(_Block(n_embd, block_size) for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(n_embd),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer["wte"].weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(cfg)


def litgpt_pythia() -> nn.Module:
    from litgpt import GPT, Config

    cfg = Config.from_name(
        "pythia-14m", n_layer=2, n_embd=32, n_head=4, padded_vocab_size=128, block_size=64
    )
    return GPT(cfg)
