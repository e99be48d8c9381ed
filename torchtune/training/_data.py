# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The recipes' data: one loader for one or N ranks, steps per epoch, an epoch's micro-batches."""

import logging
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate

log = logging.getLogger(__name__)


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    pad_id: int,
    shuffle: bool,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    collate_fn: Optional[Callable[..., Any]] = None,
) -> DataLoader:
    """This rank's loader of right-padded batches (``padded_collate``, or ``collate_fn``).

    Every rank draws the same ``(seed, epoch)`` permutation and takes samples ``rank, rank +
    world_size, ...`` of it (a ``DistributedSampler``; one replica on one device), so the union
    of the ranks' i-th batches is the one-device run's i-th batch of ``world_size *
    batch_size``, and a resumed run sees the same later epochs as an uninterrupted one. Call
    ``loader.sampler.set_epoch(epoch)`` before each epoch (:func:`epoch_micro_batches` does).

    Args:
        dataset: map-style dataset of ``{"tokens", "labels"}`` samples.
        batch_size: samples per batch on this rank.
        pad_id: the id to pad with, ``torchtune.data.padding_id(tokenizer)``.
        shuffle: shuffle each epoch.
        seed: the run's seed.
        world_size: number of ranks.
        rank: this rank.
        collate_fn: the batching function, called as ``collate_fn(samples, padding_idx=pad_id)``
            (``torchtune.data.padded_collate_pairs`` for preference pairs); default
            ``padded_collate``.

    Returns:
        The loader; its ``sampler`` is the ``DistributedSampler``.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    collate = partial(collate_fn or padded_collate, padding_idx=pad_id)
    # Its own generator: starting an epoch's iterator draws a seed from the loader's
    # generator, which would otherwise be the global one, moving the stream dropout draws
    # from by one at every epoch start, and a mid-epoch resume would draw it at another point.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    log.info(
        "Dataset: %d samples, %d batches of %d per rank, %d rank(s)",
        len(dataset),
        len(loader),
        batch_size,
        world_size,
    )
    return loader


def steps_per_epoch(
    num_batches: int, gradient_accumulation_steps: int, max_steps_per_epoch: Optional[int]
) -> int:
    """Optimizer steps in one epoch: full groups of ``gradient_accumulation_steps`` batches
    (a partial group at the end is skipped), at most ``max_steps_per_epoch``.

    Raises:
        ValueError: if the epoch has fewer batches than one step needs.
    """
    steps = num_batches // gradient_accumulation_steps
    if steps == 0:
        raise ValueError(
            f"The dataset gives {num_batches} batches per epoch, fewer than "
            f"gradient_accumulation_steps={gradient_accumulation_steps}"
        )
    if max_steps_per_epoch is not None:
        steps = min(steps, int(max_steps_per_epoch))
    return steps


def epoch_micro_batches(
    loader: DataLoader,
    epoch: int,
    num_steps: int,
    gradient_accumulation_steps: int,
    start_step: int = 0,
) -> Iterator[List[Dict[str, Any]]]:
    """The micro-batches of each optimizer step of ``epoch``, from step ``start_step`` on.

    Args:
        loader: from :func:`build_dataloader` (its sampler is set to ``epoch`` here).
        epoch: 0-based epoch; with the seed it fixes the order.
        num_steps: steps in the epoch (:func:`steps_per_epoch`).
        gradient_accumulation_steps: micro-batches per step.
        start_step: steps of this epoch already taken (``RecipeState.steps_in_epoch``); their
            batches are drawn and dropped so the order stays the uninterrupted run's.

    Yields:
        Lists of ``gradient_accumulation_steps`` batches.
    """
    loader.sampler.set_epoch(epoch)
    batches = iter(loader)
    for _ in range(start_step * gradient_accumulation_steps):
        next(batches)
    for _ in range(start_step, num_steps):
        yield [next(batches) for _ in range(gradient_accumulation_steps)]


def count_tokens(micro_batches: List[Dict[str, torch.Tensor]]) -> int:
    """Tokens of the micro-batches whose label is not ignored: no padding (nor masked
    prompt tokens), so tokens/s measures the text trained on. Batches without ``labels``
    count every token."""
    return sum(
        int((mb["labels"] != CROSS_ENTROPY_IGNORE_IDX).sum())
        if "labels" in mb
        else mb["tokens"].numel()
        for mb in micro_batches
    )
