# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Batch preference pairs: the chosen and the rejected sides as one padded batch."""

from typing import Any, Dict, Mapping, Sequence

import torch

from torchtune.data._collate import padded_collate

_SIDES = ("chosen", "rejected")


def padded_collate_pairs(
    batch: Sequence[Mapping[str, Any]], padding_idx: int = 0
) -> Dict[str, torch.Tensor]:
    """Stack ``b`` pairs into one right-padded batch of ``2b`` rows: the chosen responses in
    rows ``0..b-1``, the rejected ones in rows ``b..2b-1`` (pair ``i`` is rows ``i`` and
    ``b + i``), so one forward scores both and ``.chunk(2)`` splits them back.

    Args:
        batch: samples with ``chosen_tokens``, ``chosen_labels``, ``rejected_tokens`` and
            ``rejected_labels`` (lists or 1-D tensors; as ``preference_dataset`` yields them).
        padding_idx: token id used for padding.

    Returns:
        ``tokens`` and ``labels``, long ``[2b, s]``; padded labels are
        ``CROSS_ENTROPY_IGNORE_IDX``.

    Raises:
        ValueError: on an empty batch, a sample missing a key (named), or the errors of
            ``padded_collate``.
    """
    if len(batch) == 0:
        raise ValueError("padded_collate_pairs got an empty batch")
    rows = []
    for side in _SIDES:
        for i, sample in enumerate(batch):
            missing = [f"{side}_{k}" for k in ("tokens", "labels") if f"{side}_{k}" not in sample]
            if missing:
                raise ValueError(f"sample {i} of the batch lacks {missing}")
            rows.append({"tokens": sample[f"{side}_tokens"], "labels": sample[f"{side}_labels"]})
    return padded_collate(rows, padding_idx=padding_idx)
