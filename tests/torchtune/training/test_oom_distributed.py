# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""OomRetry on 2 CPU processes (gloo) under FSDP2: an out-of-memory error on rank 1 only,
raised inside the root module's forward (the final norm, after the last all-gather) or after
the loss, is agreed on, and the run continues with the losses and weights of a run given the
halved micro-batches from that step on."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from tests.torchtune.training.test_oom import SHAPE, _samples
from tests.torchtune.utils.test_distributed import WORLD_SIZE, _free_port, _rank_env
from torchtune import utils
from torchtune.data import padded_collate
from torchtune.models.llama2 import llama2
from torchtune.modules import TransformerDecoderLayer
from torchtune.training import ChunkedCrossEntropyLoss, OomRetry, optimizer_step, split_batch

CPU = torch.device("cpu")
STEPS, OOM_STEP = 3, 2


def _sharded(full_sd, rank):
    with torch.device("meta"):
        model = llama2(**SHAPE)
    utils.shard_model(model, CPU, layer_types=(TransformerDecoderLayer,))
    model.to_empty(device="cpu")
    utils.load_from_full_state_dict(model, dict(full_sd) if rank == 0 else None)
    return model


def _run(model, rank, oom, split_from):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(1, STEPS + 1):
        batch = padded_collate(_samples(4, seed=10 * step + rank), padding_idx=0)
        micro = split_batch(batch, 2) if split_from and step >= split_from else [batch]
        loss, _ = optimizer_step(
            model,
            ChunkedCrossEntropyLoss(num_chunks=2),
            opt,
            micro,
            params=model.parameters(),
            device=CPU,
            world_size=WORLD_SIZE,
            clip_grad_norm=0.5,
            oom=oom,
        )
        losses.append(loss)
    return losses, utils.gather_full_state_dict(model)


def _worker(rank, port, path, where):
    _rank_env(rank, port)
    utils.init_distributed(CPU)
    full_sd = torch.load(path, weights_only=True)
    model = _sharded(full_sd, rank)
    if where == "norm" and rank == 1:
        calls = []

        def fail_once(module, args, out):  # inside the root's forward, after every layer
            calls.append(1)
            if len(calls) == OOM_STEP:  # the first forward of that step
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

        model.norm.register_forward_hook(fail_once)
    if where == "loss":
        os.environ.update(TUNE_TEST_OOM_AT_STEP=str(OOM_STEP), TUNE_TEST_OOM_RANK="1")
    oom = OomRetry(CPU, world_size=WORLD_SIZE, rank=rank)
    ours = _run(model, rank, oom, split_from=None)
    os.environ.pop("TUNE_TEST_OOM_AT_STEP", None)
    ref = _run(_sharded(full_sd, rank), rank, None, split_from=OOM_STEP)
    if rank == 0:
        torch.save({"ours": ours, "ref": ref, "splits": oom.splits}, path + ".out")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["loss", "norm"])
def test_oom_on_one_rank_is_agreed_and_retried(tmp_path, where):
    torch.manual_seed(0)
    path = str(tmp_path / "sd.pt")
    torch.save(llama2(**SHAPE).state_dict(), path)
    ctx = mp.spawn(_worker, args=(_free_port(), path, where), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 240  # a disagreement hangs in a collective: fail instead
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks hung (a collective that not every rank entered)")
    out = torch.load(path + ".out", weights_only=True)
    (losses, sd), (ref_losses, ref_sd) = out["ours"], out["ref"]
    assert out["splits"] == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-6)
    for k, v in ref_sd.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6, msg=k)
