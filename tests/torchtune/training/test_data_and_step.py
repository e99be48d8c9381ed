# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The kit's data loader (one and two simulated ranks) against the recipes' former loader,
steps per epoch, and ``optimizer_step`` against a plain accumulation loop."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from torchtune.data import padded_collate
from torchtune.models.llama2 import llama2
from torchtune.training import (
    ChunkedCrossEntropyLoss,
    build_dataloader,
    epoch_micro_batches,
    optimizer_step,
    steps_per_epoch,
)

IGNORE = -100
PAD = 0


def _dataset(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 17, (1,), generator=g))
        n_prompt = int(torch.randint(0, length, (1,), generator=g))
        tokens = torch.randint(3, 61, (length,), generator=g).tolist()
        out.append({"tokens": tokens, "labels": [IGNORE] * n_prompt + tokens[n_prompt:]})
    return out


def _former_loader(ds, batch_size, shuffle, seed, world_size, rank):
    # What the recipes' _setup_data built before the kit.
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    collate = partial(padded_collate, padding_idx=PAD)  # ignore_idx was the default, -100
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_order_is_the_former_one(world_size, shuffle):
    ds = _dataset()
    for rank in range(world_size):
        loader = build_dataloader(
            ds, batch_size=3, pad_id=PAD, shuffle=shuffle, seed=5, world_size=world_size, rank=rank
        )
        former = _former_loader(ds, 3, shuffle, 5, world_size, rank)
        for epoch in (0, 1):
            former.sampler.set_epoch(epoch)
            got = [
                b for step in epoch_micro_batches(loader, epoch, 4 // world_size, 1) for b in step
            ]
            _assert_same_batches(got, list(former)[: len(got)])


def test_two_ranks_split_the_one_device_order():
    ds = _dataset(n=24)
    one = build_dataloader(ds, batch_size=4, pad_id=PAD, shuffle=True, seed=3)
    ranks = [
        build_dataloader(ds, batch_size=2, pad_id=PAD, shuffle=True, seed=3, world_size=2, rank=r)
        for r in range(2)
    ]
    one.sampler.set_epoch(1)
    for r in ranks:
        r.sampler.set_epoch(1)
    # Rank r takes samples r, r + 2, ... of the epoch's order.
    one_order = list(one.sampler)
    assert list(ranks[0].sampler) == one_order[0::2]
    assert list(ranks[1].sampler) == one_order[1::2]


def test_epoch_micro_batches_groups_and_resumes_mid_epoch():
    ds = _dataset()
    loader = build_dataloader(ds, batch_size=2, pad_id=PAD, shuffle=True, seed=1)
    steps = list(epoch_micro_batches(loader, 2, 4, 3))
    assert [len(s) for s in steps] == [3, 3, 3, 3]
    later = list(epoch_micro_batches(loader, 2, 4, 3, start_step=2))
    _assert_same_batches([b for s in later for b in s], [b for s in steps[2:] for b in s])


def test_steps_per_epoch():
    assert steps_per_epoch(10, 3, None) == 3  # the partial group is skipped
    assert steps_per_epoch(10, 3, 2) == 2
    assert steps_per_epoch(10, 1, 50) == 10
    with pytest.raises(ValueError, match="gives 2 batches per epoch, fewer than "):
        steps_per_epoch(2, 3, None)


SHAPE = dict(
    vocab_size=61,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    intermediate_dim=44,
    max_seq_len=32,
)


def _plain_step(model, micro_batches, optimizer, clip):
    """The textbook loop: sum of token CEs over the step / the step's scored tokens."""
    n_scored = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)
    total = 0.0
    for mb in micro_batches:
        logits = model(mb["tokens"])  # [b, s, v]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            mb["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        (loss / n_scored).backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n_scored, grads


@pytest.mark.parametrize("clip", [None, 0.05])
def test_optimizer_step_equals_a_plain_accumulation_loop(clip):
    torch.manual_seed(0)
    ours = llama2(**SHAPE)
    ref = llama2(**SHAPE)
    ref.load_state_dict(ours.state_dict())
    loader = build_dataloader(_dataset(n=12), batch_size=3, pad_id=PAD, shuffle=False, seed=0)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 1.0 / (1 + step))
    captured = {}

    def keep_grads(module, *_):
        captured.update({n: p.grad.clone() for n, p in ours.named_parameters()})

    # The gradients optimizer_step hands the optimizer (after the last backward, before
    # clipping), and the parameters after the step.
    hook = opt.register_step_pre_hook(keep_grads)
    for micro in epoch_micro_batches(loader, 0, 2, 2):
        loss, tokens = optimizer_step(
            ours,
            ChunkedCrossEntropyLoss(num_chunks=2),
            opt,
            micro,
            params=ours.parameters(),
            device=torch.device("cpu"),
            clip_grad_norm=clip,
            lr_scheduler=sched,
        )
        ref_loss, ref_grads = _plain_step(ref, micro, ref_opt, clip)
        ref_sched.step()
        # Tokens whose label is scored: no padding, no masked prompt.
        assert tokens == sum(int((mb["labels"] != -100).sum()) for mb in micro)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        if clip is None:
            for n, g in ref_grads.items():
                torch.testing.assert_close(captured[n], g, rtol=1e-4, atol=1e-6, msg=n)
        for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
        assert all(p.grad is None for p in ours.parameters())
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    hook.remove()


def test_build_lr_scheduler_continues_from_the_global_step():
    from omegaconf import OmegaConf

    from torchtune import training

    cfg = OmegaConf.create(
        {"_component_": "torchtune.training.get_cosine_schedule_with_warmup", "num_warmup_steps": 2}
    )

    def lrs(global_step, n):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        for group in opt.param_groups:  # as after a resumed optimizer state
            group.setdefault("initial_lr", 1.0)
        sched = training.build_lr_scheduler(
            cfg, opt, num_training_steps=10, global_step=global_step
        )
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(3, 4) == lrs(0, 7)[3:]
    assert training.build_lr_scheduler(None, None, num_training_steps=1, global_step=0) is None
