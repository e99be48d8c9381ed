# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""One optimizer step over a list of micro-batches, on one device or on N FSDP ranks."""

from functools import partial
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from torchtune import utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.training._data import count_tokens
from torchtune.training._next_token_loss import next_token_loss_sum
from torchtune.training._oom import UNGUARDED, OomRetry


def optimizer_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: List[Dict[str, Any]],
    *,
    params: Iterable[nn.Parameter],
    device: torch.device,
    world_size: int = 1,
    clip_grad_norm: Optional[float] = None,
    lr_scheduler: Optional[Any] = None,
    oom: Optional[OomRetry] = None,
) -> Tuple[float, int]:
    """Backward over every micro-batch, then clip, step, zero the gradients, step the lr.

    The step's loss is the sum of token losses over all ranks' micro-batches divided by the
    global count of scored tokens, counted up front (an all-reduce on N ranks), so each
    micro-batch's backward is already scaled for the whole step: ``k`` micro-batches on ``W``
    ranks give exactly the gradient of one batch ``k * W`` times larger, whatever the padding.

    Args:
        model: the model (FSDP-sharded when ``world_size > 1``).
        loss_fn: the recipe's loss (see :func:`next_token_loss_sum`).
        optimizer: over ``params``.
        micro_batches: this rank's batches of the step; each has ``tokens`` and ``labels``
            ``[b, s]`` (anything else is passed on to :func:`next_token_loss_sum`).
        params: the trained parameters (clipped together).
        device: where the model is.
        world_size: ranks whose gradients FSDP averages (1 on one device).
        clip_grad_norm: max total gradient norm of ``params``, or None.
        lr_scheduler: stepped after the optimizer, or None.
        oom: retries the step with smaller micro-batches when one runs out of memory
            (:class:`~torchtune.training.OomRetry`); None lets the error through.

    Returns:
        ``(loss, tokens)``: the step's mean token loss over all ranks, and the tokens
        (scored ones, ``count_tokens``) all ranks processed. A CPU-GPU sync point.
    """
    step = partial(
        _step,
        model,
        loss_fn,
        optimizer,
        params=list(params),  # a retried step clips them again
        device=device,
        world_size=world_size,
        clip_grad_norm=clip_grad_norm,
        lr_scheduler=lr_scheduler,
    )
    if oom is None:
        return step(micro_batches, guard=UNGUARDED)
    return oom.run(partial(step, guard=oom), micro_batches, model=model, optimizer=optimizer)


def _step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: List[Dict[str, Any]],
    *,
    params: List[nn.Parameter],
    device: torch.device,
    world_size: int,
    clip_grad_norm: Optional[float],
    lr_scheduler: Optional[Any],
    guard: Any,
) -> Tuple[float, int]:
    # Counted up front, over all ranks, so each backward is already scaled for the step.
    num_scored = sum(
        int((mb["labels"][:, 1:] != CROSS_ENTROPY_IGNORE_IDX).sum()) for mb in micro_batches
    )
    if world_size > 1:
        num_scored = int(utils.all_reduce_sum([num_scored], device)[0])
    denom = max(num_scored, 1)
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        loss_sum, _ = guard.forward(next_token_loss_sum, model, loss_fn, mb, device)
        # FSDP averages gradients over ranks; times W, that mean is the global sum.
        guard.backward(loss_sum / denom * world_size)  # exact for world_size=1
        total += loss_sum.detach()
    if clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(params, max_norm=float(clip_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    n_tokens = count_tokens(micro_batches)
    if world_size == 1:
        return (total / denom).item(), n_tokens
    loss_sum, n_tokens = utils.all_reduce_sum([total.item(), n_tokens], device).tolist()
    return loss_sum / denom, int(n_tokens)
