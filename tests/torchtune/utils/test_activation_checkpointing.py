# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Activation checkpointing must not change the loss or any gradient."""

import copy

import pytest
import torch
import torch.nn.functional as F

from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.utils import apply_activation_checkpointing, set_activation_checkpointing


def _loss_and_grads(model, tokens, mask=None):
    model.zero_grad()
    logits = model(tokens, mask=mask)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("selective", [False, True])
def test_checkpointing_keeps_loss_and_grads(selective):
    torch.manual_seed(0)
    model = llama2(
        vocab_size=61,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        max_seq_len=32,
        intermediate_dim=40,
        attn_dropout=0.0,
    )
    ckpt = copy.deepcopy(model)
    assert set_activation_checkpointing(ckpt, selective=selective) == 3
    assert set_activation_checkpointing(ckpt, selective=selective) == 0  # idempotent
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
        ["q_proj", "v_proj"],
        vocab_size=61,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        embed_dim=32,
        max_seq_len=32,
        lora_rank=2,
        lora_alpha=4.0,
    )
    set_trainable_params(model, get_adapter_params(model))
    set_activation_checkpointing(model)
    copied = copy.deepcopy(model)
    for m in (model, copied):
        calls = []
        m.layers[0].attn.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        m(torch.randint(0, 61, (1, 5))).sum().backward()
        assert len(calls) == 2
    assert copied.layers[0].forward.__self__ is copied.layers[0]


def _ops_in_backward(model, tokens):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    loss = model(tokens).sum()
    with Count() as count:
        loss.backward()
    return count.ops


def test_selective_checkpointing_keeps_matmuls_and_recomputes_the_rest():
    torch.manual_seed(0)
    shape = dict(
        vocab_size=61,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        embed_dim=32,
        max_seq_len=32,
        intermediate_dim=96,
    )
    plain = llama2(**shape)
    selective, whole = copy.deepcopy(plain), copy.deepcopy(plain)
    set_activation_checkpointing(selective, selective=True)
    set_activation_checkpointing(whole)
    tokens = torch.randint(0, 61, (2, 17))
    ops = {
        name: _ops_in_backward(m, tokens)
        for name, m in [("plain", plain), ("selective", selective), ("whole", whole)]
    }

    def count(name, *packets):
        return sum(op.overloadpacket in packets for op in ops[name])

    aten = torch.ops.aten
    # Selective backward reruns no matmul (their outputs were kept); whole-layer
    # checkpointing reruns at least the 6 of each of the 2 layers that lead to something
    # backward needs (recompute stops before w2, whose output nothing in the layer needs).
    assert count("selective", aten.mm, aten.addmm) == count("plain", aten.mm, aten.addmm)
    assert count("whole", aten.mm, aten.addmm) >= count("plain", aten.mm, aten.addmm) + 2 * 6
    # Both rerun the forward's SiLU of each layer (plain backward runs it once per layer too:
    # SwiGLU's backward recomputes it).
    assert (
        count("selective", aten.silu) == count("whole", aten.silu) == count("plain", aten.silu) + 2
    )


def test_apply_activation_checkpointing_reads_the_config_value():
    shape = dict(
        vocab_size=61,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        embed_dim=32,
        max_seq_len=32,
        intermediate_dim=40,
    )
    assert apply_activation_checkpointing(llama2(**shape), False) == 0
    assert apply_activation_checkpointing(llama2(**shape), None) == 0
    assert apply_activation_checkpointing(llama2(**shape), True) == 2
    assert apply_activation_checkpointing(llama2(**shape), "selective") == 2
    with pytest.raises(ValueError, match="enable_activation_checkpointing.*'full'"):
        apply_activation_checkpointing(llama2(**shape), "full")
