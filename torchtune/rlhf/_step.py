# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""One optimizer step of preference tuning over a list of micro-batches of pairs."""

from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from torchtune import utils
from torchtune.rlhf._logps import sequence_logps
from torchtune.training import OomRetry, count_tokens
from torchtune.training._oom import UNGUARDED

# Computes the reference's ``(logps, lengths)`` ``[2b]`` of a pair batch, without gradients.
ReferenceFn = Callable[[Dict[str, Any]], Tuple[torch.Tensor, torch.Tensor]]


def preference_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: List[Dict[str, Any]],
    *,
    params: Iterable[nn.Parameter],
    device: torch.device,
    reference: Optional[ReferenceFn],
    world_size: int = 1,
    clip_grad_norm: Optional[float] = None,
    lr_scheduler: Optional[Any] = None,
    oom: Optional[OomRetry] = None,
) -> Dict[str, float]:
    """Backward over every micro-batch of pairs, then clip, step, zero the gradients, step the lr.

    The step's loss is the mean of the per-pair losses over all its micro-batches on all
    ranks (each micro-batch's backward is scaled by its share of the step's pairs, counted up
    front), so ``k`` micro-batches on ``W`` ranks give the gradient of one batch ``k * W`` times
    larger. Chosen and
    rejected rows go through the model together, their shared prompt once
    (:func:`sequence_logps` with ``pairs``).

    Args:
        model: the policy (FSDP-sharded when ``world_size > 1``).
        loss_fn: ``DPOLoss``, ``IPOLoss`` or ``SimPOLoss`` (``torchtune.rlhf``).
        optimizer: over ``params``.
        micro_batches: pair batches (``padded_collate_pairs``): ``tokens`` / ``labels``
            ``[2b, s]``, the ``b`` chosen rows first.
        params: the trained parameters (clipped together).
        device: where the model is.
        reference: the reference's log-probabilities of a batch, or None for a loss that has
            no reference (``loss_fn.needs_reference`` False).
        clip_grad_norm: max total gradient norm of ``params``, or None.
        lr_scheduler: stepped after the optimizer, or None.
        oom: retries the step with fewer pairs per micro-batch when one runs out of memory
            (:class:`~torchtune.training.OomRetry`); None lets the error through.

    Returns:
        The step's metrics under TRL's names, means over its pairs on all ranks: ``loss``,
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected`` (summed policy log-probabilities), and ``tokens``
        (scored ones, ``count_tokens``, all ranks). A CPU-GPU sync point (and all-reduces on N
        ranks).

    Raises:
        ValueError: if the loss needs a reference and none is given.
    """
    if loss_fn.needs_reference and reference is None:
        raise ValueError(f"{type(loss_fn).__name__} needs a reference model; reference is None")
    step = partial(
        _step,
        model,
        loss_fn,
        optimizer,
        params=list(params),  # a retried step clips them again
        device=device,
        reference=reference,
        world_size=world_size,
        clip_grad_norm=clip_grad_norm,
        lr_scheduler=lr_scheduler,
    )
    if oom is None:
        return step(micro_batches, guard=UNGUARDED)
    return oom.run(
        partial(step, guard=oom), micro_batches, model=model, optimizer=optimizer, paired=True
    )


def _step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: List[Dict[str, Any]],
    *,
    params: List[nn.Parameter],
    device: torch.device,
    reference: Optional[ReferenceFn],
    world_size: int,
    clip_grad_norm: Optional[float],
    lr_scheduler: Optional[Any],
    guard: Any,
) -> Dict[str, float]:
    num_pairs = sum(mb["tokens"].shape[0] // 2 for mb in micro_batches)
    if world_size > 1:
        num_pairs = int(utils.all_reduce_sum([num_pairs], device)[0])
    sums = torch.zeros(7, device=device, dtype=torch.float64)
    for mb in micro_batches:
        losses, chosen_rewards, rejected_rewards, chosen, rejected = guard.forward(
            _pair_losses, model, loss_fn, mb, device, reference
        )
        # FSDP averages gradients over ranks; times W, that mean is the global sum.
        guard.backward(losses.sum() / num_pairs * world_size)
        per_pair = torch.stack(
            [
                losses.detach(),
                chosen_rewards,
                rejected_rewards,
                (chosen_rewards > rejected_rewards).float(),
                chosen_rewards - rejected_rewards,
                chosen.detach(),
                rejected.detach(),
            ]
        )  # [7, b]
        sums += per_pair.sum(dim=1).double()
    if clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(params, max_norm=float(clip_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    n_tokens = count_tokens(micro_batches)
    if world_size > 1:
        totals = utils.all_reduce_sum([*sums.tolist(), n_tokens], device).tolist()
        sums, n_tokens = torch.tensor(totals[:-1], dtype=torch.float64), int(totals[-1])
    means = (sums / num_pairs).tolist()
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies")
    names += ("rewards/margins", "logps/chosen", "logps/rejected")
    metrics = dict(zip(names, means))
    metrics["tokens"] = n_tokens
    return metrics


def _pair_losses(
    model: nn.Module,
    loss_fn: nn.Module,
    mb: Dict[str, Any],
    device: torch.device,
    reference: Optional[ReferenceFn],
) -> Tuple[torch.Tensor, ...]:
    """One micro-batch's per-pair ``(losses, chosen_rewards, rejected_rewards, chosen_logps,
    rejected_logps)``, each ``[b]``."""
    ref_chosen = ref_rejected = None
    if loss_fn.needs_reference:
        with torch.no_grad():
            ref_logps, _ = reference(mb)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
    logps, lengths = sequence_logps(model, mb, device, pairs=True)
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    losses, chosen_rewards, rejected_rewards = loss_fn(
        chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len
    )
    return losses, chosen_rewards, rejected_rewards, chosen, rejected
