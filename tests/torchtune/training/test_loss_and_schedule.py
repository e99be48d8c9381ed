# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest
import torch
import torch.nn.functional as F

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.training import (
    ChunkedCrossEntropyLoss,
    LinearCrossEntropyLoss,
    get_cosine_schedule_with_warmup,
)


@pytest.mark.parametrize("num_chunks", [1, 3, 8, 50])
def test_chunked_ce_matches_plain_ce(num_chunks):
    torch.manual_seed(0)
    b, s, v = 3, 17, 41
    logits = torch.randn(b, s, v, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, v, (b, s))
    labels[0, :5] = -100
    labels[2, 10:] = -100
    loss_sum, n = ChunkedCrossEntropyLoss(num_chunks=num_chunks)(logits, labels)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, v), labels.reshape(-1), reduction="sum")
    assert n.item() == int((labels != -100).sum())
    torch.testing.assert_close(loss_sum, ref, rtol=0, atol=1e-6 * ref.abs().item())
    (loss_sum / n).backward()
    (ref / n).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-7)


def test_chunked_ce_upcasts_bf16():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 33).to(torch.bfloat16)
    labels = torch.randint(0, 33, (2, 9))
    loss_sum, _ = ChunkedCrossEntropyLoss(num_chunks=4)(logits, labels)
    assert loss_sum.dtype == torch.float32
    ref = F.cross_entropy(logits.float().reshape(-1, 33), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss_sum, ref, rtol=1e-6, atol=1e-6)


def test_chunked_ce_bad_shapes():
    with pytest.raises(ValueError, match=r"\[b, s, vocab\]"):
        ChunkedCrossEntropyLoss()(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_chunks"):
        ChunkedCrossEntropyLoss(num_chunks=0)


def test_cosine_schedule_matches_transformers():
    transformers = pytest.importorskip("transformers")
    params = [torch.nn.Parameter(torch.zeros(1))]
    ours_opt = torch.optim.SGD(params, lr=0.3)
    ref_opt = torch.optim.SGD(params, lr=0.3)
    ours = get_cosine_schedule_with_warmup(ours_opt, num_warmup_steps=4, num_training_steps=20)
    ref = transformers.get_cosine_schedule_with_warmup(ref_opt, 4, 20)
    lrs, ref_lrs = [], []
    for _ in range(25):
        lrs.append(ours_opt.param_groups[0]["lr"])
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()
    assert lrs == pytest.approx(ref_lrs, abs=1e-12)
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.3) and lrs[20] == pytest.approx(0.0)


def test_cosine_schedule_resumes_mid_run():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, 3, 10)
    for _ in range(6):
        opt.step(), sched.step()
    expected = opt.param_groups[0]["lr"]
    opt2 = torch.optim.SGD(params, lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    get_cosine_schedule_with_warmup(opt2, 3, 10, last_epoch=5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected)


def _largest_saved_fp32(fn):
    """numel of the largest fp32 tensor autograd keeps for backward while ``fn`` runs."""
    sizes = [0]

    def pack(t):
        if t.dtype == torch.float32:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_chunked_ce_keeps_no_full_fp32_logits_for_backward():
    b, s, v = 2, 64, 300
    logits = torch.randn(b, s, v).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (b, s))
    loss = ChunkedCrossEntropyLoss(num_chunks=8)

    def plain():
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")

    # The probe sees the plain loss's fp32 log-softmax of the whole batch...
    assert _largest_saved_fp32(plain) == b * s * v
    # ...and nothing of that size (not even one chunk's) from the chunked loss.
    assert _largest_saved_fp32(lambda: loss(logits, labels)) < b * s * v // 8


@pytest.mark.parametrize("loss_cls", [ChunkedCrossEntropyLoss, LinearCrossEntropyLoss])
def test_losses_skip_the_one_ignore_value_and_take_no_other(loss_cls):
    # CROSS_ENTROPY_IGNORE_IDX is the label the datasets write; it is not a loss setting.
    with pytest.raises(TypeError, match="ignore_index"):
        loss_cls(num_chunks=2, ignore_index=-1)
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :4] = CROSS_ENTROPY_IGNORE_IDX
    hidden = torch.randn(2, 6, 5)
    projection = torch.nn.Linear(5, 11)
    if loss_cls is LinearCrossEntropyLoss:
        loss_sum, n = loss_cls(num_chunks=2)(hidden, projection, labels)
    else:
        loss_sum, n = loss_cls(num_chunks=2)(projection(hidden), labels)
    keep = labels != CROSS_ENTROPY_IGNORE_IDX
    ref = F.cross_entropy(projection(hidden)[keep], labels[keep], reduction="sum")
    assert n.item() == int(keep.sum()) == 8
    torch.testing.assert_close(loss_sum, ref.detach(), rtol=1e-6, atol=1e-6)
