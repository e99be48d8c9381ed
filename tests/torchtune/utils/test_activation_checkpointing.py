# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Activation checkpointing must not change the loss or any gradient."""
import copy

import torch
import torch.nn.functional as F

from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.utils import set_activation_checkpointing


def _loss_and_grads(model, tokens, mask=None):
    model.zero_grad()
    logits = model(tokens, mask=mask)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_keeps_loss_and_grads():
    torch.manual_seed(0)
    model = llama2(
        vocab_size=61, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32,
        max_seq_len=32, intermediate_dim=40, attn_dropout=0.0,
    )  # fmt: skip
    ckpt = copy.deepcopy(model)
    assert set_activation_checkpointing(ckpt) == 3
    assert set_activation_checkpointing(ckpt) == 0  # idempotent
    assert list(ckpt.state_dict()) == list(model.state_dict())
    tokens = torch.randint(0, 61, (2, 17))
    mask = torch.ones(17, 17, dtype=torch.bool).tril().expand(2, 17, 17)
    for m in (None, mask):
        loss, grads = _loss_and_grads(model, tokens, m)
        loss_c, grads_c = _loss_and_grads(ckpt, tokens, m)
        torch.testing.assert_close(loss_c, loss, atol=0, rtol=0)
        assert grads.keys() == grads_c.keys() and len(grads) == len(list(model.parameters()))
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], atol=1e-7, rtol=1e-6)


def test_checkpointing_recomputes_and_deepcopies():
    """The layer's forward really runs twice (once in backward), also on a deep copy."""
    torch.manual_seed(0)
    model = lora_llama2(
        ["q_proj", "v_proj"], vocab_size=61, num_layers=1, num_heads=4, num_kv_heads=4,
        embed_dim=32, max_seq_len=32, lora_rank=2, lora_alpha=4.0,
    )  # fmt: skip
    set_trainable_params(model, get_adapter_params(model))
    set_activation_checkpointing(model)
    copied = copy.deepcopy(model)
    for m in (model, copied):
        calls = []
        m.layers[0].attn.register_forward_pre_hook(lambda *_: calls.append(1))
        m(torch.randint(0, 61, (1, 5))).sum().backward()
        assert len(calls) == 2
    assert copied.layers[0].forward.__self__ is copied.layers[0]
