# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""benchmarks/dpo.py: both sides train the same DPO steps (the comparison is of like with like)."""

import argparse

import torch

from benchmarks import dpo


def _args(**kw):
    args = dict(shape="tiny", device="cpu", dtype="fp32", pairs_per_step=3, steps=3, warmup=1)
    args.update(max_seq_len=128, threads=1, seed=0)
    args.update(kw)
    return argparse.Namespace(**args)


def test_both_sides_log_the_same_dpo_losses():
    args = _args()
    ours, _ = dpo._build("ours", args)
    theirs, _ = dpo._build("theirs", args)
    batches = dpo.make_pair_batches(args)
    assert len(batches) == 4 and batches[0]["tokens"].shape[0] == 6
    ours_losses = torch.tensor([ours(b) for b in batches])
    theirs_losses = torch.tensor([theirs(b) for b in batches])
    torch.testing.assert_close(ours_losses, theirs_losses, rtol=0, atol=1e-4)
    assert (ours_losses[0] - ours_losses[-1]).abs() > 1e-4  # training moved the loss
