# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""LinearCrossEntropyLoss against plain autograd: F.cross_entropy(projection(hidden))."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchtune.modules.peft import LoRALinear
from torchtune.training import LinearCrossEntropyLoss


def _case(projection: nn.Module, n: int = 53, d: int = 19, seed: int = 0):
    torch.manual_seed(seed)
    hidden = torch.randn(n, d, requires_grad=True)
    vocab = projection(hidden[:1]).shape[-1]
    labels = torch.randint(0, vocab, (n,))
    labels[:7] = -100
    labels[30:33] = -100
    return hidden, labels


def _reference(projection, hidden, labels):
    """Loss sum and the gradients of hidden and every trainable parameter, by autograd."""
    logits = projection(hidden).float()
    loss = F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
    params = [p for p in projection.parameters() if p.requires_grad]
    n = (labels != -100).sum()
    grads = torch.autograd.grad(loss / n, [hidden, *params])
    return loss.detach(), grads


def _ours(projection, hidden, labels, num_chunks):
    loss, n = LinearCrossEntropyLoss(num_chunks=num_chunks)(hidden, projection, labels)
    params = [p for p in projection.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss / n, [hidden, *params])
    return loss.detach(), n, grads


@pytest.mark.parametrize("num_chunks", [1, 3, 8, 100])
@pytest.mark.parametrize("kind", ["linear", "frozen", "lora", "bias"])
def test_loss_and_grads_match_autograd(num_chunks, kind):
    torch.manual_seed(1)
    if kind == "lora":
        projection = LoRALinear(19, 41, rank=4, alpha=8.0)
        nn.init.normal_(projection.lora_b.weight)
        projection.weight.requires_grad_(False)
    else:
        projection = nn.Linear(19, 41, bias=kind == "bias")
        if kind == "frozen":
            projection.requires_grad_(False)
    hidden, labels = _case(projection)
    ref_loss, ref_grads = _reference(projection, hidden, labels)
    loss, n, grads = _ours(projection, hidden, labels, num_chunks)
    assert n.item() == int((labels != -100).sum())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert len(grads) == len(ref_grads)
    for g, ref in zip(grads, ref_grads):
        # Chunked matmuls sum in another order: fp32 rounding, gradients are O(1e-2).
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_accumulates_into_param_grad_like_autograd():
    # Two micro-batches backpropagated into .grad (the recipes' gradient accumulation).
    torch.manual_seed(2)
    ours, ref = nn.Linear(19, 41), nn.Linear(19, 41)
    ref.load_state_dict(ours.state_dict())
    for seed in (0, 1):
        hidden, labels = _case(ours, seed=seed)
        loss, n = LinearCrossEntropyLoss(num_chunks=4)(hidden, ours, labels)
        (loss / 100).backward()
        ref_loss = F.cross_entropy(ref(hidden.detach()), labels, reduction="sum")
        (ref_loss / 100).backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-8)


def test_bf16_projection_scores_in_fp32():
    torch.manual_seed(3)
    hidden, labels = _case(nn.Linear(19, 41))
    projection = nn.Linear(19, 41).to(torch.bfloat16)
    hidden = hidden.detach().bfloat16().requires_grad_()
    loss, _ = LinearCrossEntropyLoss(num_chunks=3)(hidden, projection, labels)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(projection(hidden).float(), labels, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and projection.weight.grad.dtype == torch.bfloat16


def test_no_grad_gives_the_same_loss():
    projection = nn.Linear(19, 41)
    hidden, labels = _case(projection)
    with_grad, _ = LinearCrossEntropyLoss(num_chunks=5)(hidden, projection, labels)
    with torch.no_grad():
        without, n = LinearCrossEntropyLoss(num_chunks=5)(hidden, projection, labels)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def test_never_holds_more_than_a_chunk_of_logits():
    # The largest fp32 tensor alive at once while the loss runs is a chunk's logits.
    projection = nn.Linear(19, 400)
    hidden, labels = _case(projection, n=80)
    sizes = []

    class Spy(nn.Module):
        def forward(self, x):
            out = projection(x)
            sizes.append(out.numel())
            return out

    loss, _ = LinearCrossEntropyLoss(num_chunks=8)(hidden, Spy(), labels)
    loss.backward()
    assert max(sizes) == 10 * 400


def test_bad_input_raises():
    with pytest.raises(ValueError, match="num_chunks"):
        LinearCrossEntropyLoss(num_chunks=0)
    with pytest.raises(ValueError, match="feature dim"):
        LinearCrossEntropyLoss()(
            torch.randn(4, 3), nn.Linear(3, 5), torch.zeros(5, dtype=torch.long)
        )


@pytest.mark.parametrize("n", [0, 3])
def test_no_scored_token_gives_zero_loss_and_grads(n):
    # A micro-batch that is all prompt (train_on_input=False) or empty scores nothing.
    projection = nn.Linear(5, 7)
    hidden = torch.randn(n, 5, requires_grad=True)
    loss, count = LinearCrossEntropyLoss(num_chunks=4)(hidden, projection, torch.full((n,), -100))
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert hidden.grad.abs().sum() == 0 and projection.weight.grad.abs().sum() == 0


def test_linear_with_hooks_runs_through_its_forward():
    # A plain nn.Linear has its matmuls written out; hooks (FSDP's unshard, say) must not be
    # skipped, so a hooked linear goes through the module and gives the same result.
    torch.manual_seed(4)
    plain, hooked = nn.Linear(19, 41), nn.Linear(19, 41)
    hooked.load_state_dict(plain.state_dict())
    calls = []
    hooked.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    hidden, labels = _case(plain)
    loss, _, grads = _ours(plain, hidden, labels, num_chunks=3)
    hooked_loss, _, hooked_grads = _ours(hooked, hidden, labels, num_chunks=3)
    assert calls == [18, 18, 17]
    torch.testing.assert_close(hooked_loss, loss, rtol=1e-6, atol=0)
    for g, ref in zip(hooked_grads, grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
