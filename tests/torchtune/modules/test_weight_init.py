# Copyright (c) torchtune contributors. BSD-3-Clause license.
import math

import pytest
import torch
import torch.nn.functional as F

from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules import init_weights_

VOCAB, LAYERS = 321, 4


def _model():
    return llama2(
        vocab_size=VOCAB,
        num_layers=LAYERS,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=64,
        intermediate_dim=176,
    )


def test_init_statistics():
    torch.manual_seed(0)
    model = _model()
    init_weights_(model, std=0.02)
    residual = 0.02 / math.sqrt(2 * LAYERS)
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        target = residual if ("output_proj" in name or "mlp.w2" in name) else 0.02
        # Every tensor has >= 4096 entries: the sample std is within ~3% of the target.
        assert abs(p.std().item() - target) < 0.1 * target, (name, p.std().item(), target)
        assert abs(p.mean().item()) < 0.1 * target, name


def test_init_gives_uniform_predictions_at_start():
    """From scratch, small logits: the first loss is close to log(vocab)."""
    torch.manual_seed(0)
    model = _model()
    tokens = torch.randint(0, VOCAB, (2, 33))
    default_loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    init_weights_(model)
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - math.log(VOCAB)) < 0.02
    assert abs(default_loss.item() - math.log(VOCAB)) > 0.1  # the default init is not this


def test_init_lora_and_errors():
    torch.manual_seed(0)
    model = lora_llama2(
        ["q_proj", "output_proj"],
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        embed_dim=64,
        max_seq_len=16,
        lora_rank=4,
        lora_alpha=8.0,
    )
    init_weights_(model)
    for i in range(2):
        attn = model.layers[i].attn
        assert torch.count_nonzero(attn.q_proj.lora_b.weight) == 0
        assert attn.q_proj.lora_a.weight.abs().max() > 0.05  # kaiming, not N(0, 0.02)
        assert abs(attn.output_proj.weight.std().item() - 0.01) < 0.002
    with pytest.raises(ValueError, match="std"):
        init_weights_(model, std=0.0)
    with pytest.raises(ValueError, match="num_layers"):
        init_weights_(torch.nn.Linear(4, 4))
