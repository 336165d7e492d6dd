"""Deep copies inside ``deferred_init`` blocks, in a process of their own: before the fix,
torch's copy of a fake tensor copied its fake mode, whose weak storage references were then
freed twice (a segmentation fault or "corrupted double-linked list" at a later block's end).

``python -m support.run_deepcopy_in_block CASE`` builds the case's model three times, eager
and deferred, and prints ``same`` when every build is bit-identical to eager's, with the
generator where eager leaves it.
"""

from __future__ import annotations

import gc
import sys
import warnings

import torch
from torch import nn

import lightning_meta as lm


def _encoder() -> nn.Module:
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(1.0))  # a constant, before the copies
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)
    model.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return model


def _oneformer() -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.OneFormerConfig(
        backbone_config=dict(
            model_type="swin",
            embed_dim=32,
            depths=[1, 1, 1, 1],
            num_heads=[1, 2, 4, 8],
            window_size=4,
            image_size=32,
        ),
        text_encoder_vocab_size=100,
        hidden_dim=32,
        num_attention_heads=4,
        encoder_layers=1,
        decoder_layers=2,
        dim_feedforward=64,
        conv_dim=32,
        mask_dim=32,
        text_encoder_width=32,
        text_encoder_num_layers=2,
        text_encoder_context_length=16,
        text_encoder_proj_layers=1,
        num_queries=8,
        encoder_feedforward_dim=64,
    )
    return transformers.OneFormerModel(config)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return found


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    build = {"encoder": _encoder, "oneformer": _oneformer}[sys.argv[1]]
    for _ in range(3):
        torch.manual_seed(0)
        eager = build()
        after_eager = torch.get_rng_state()
        torch.manual_seed(0)
        with lm.deferred_init():
            deferred = build()
        lm.materialize(deferred)
        assert torch.equal(torch.get_rng_state(), after_eager)
        a, b = _state(eager), _state(deferred)
        assert a.keys() == b.keys()
        differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert not differ, differ
        del eager, deferred, a, b
        gc.collect()
    print("same")


if __name__ == "__main__":
    main()
