"""The Llama-style configurations the benchmarks share (imported from the benchmarks' folder)."""

from __future__ import annotations

from typing import Any


def llama_config(small: bool) -> Any:
    """The ~270M-parameter model of issues 3-5 (hidden 1024, 16 layers), or a ~7M one."""
    from transformers import LlamaConfig

    if small:
        return LlamaConfig(
            hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, vocab_size=8000,
        )  # fmt: skip
    return LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
    )  # fmt: skip
