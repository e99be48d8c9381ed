# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Batch samples into padded tensors."""

from typing import Any, Dict, List, Mapping, Sequence, Union

import torch

from torchtune.data._common import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.attention import DocumentMask


def padded_collate(
    batch: Sequence[Mapping[str, Any]], padding_idx: int = 0
) -> Dict[str, Union[torch.Tensor, DocumentMask]]:
    """Right-pad a list of samples to the longest one and stack them.

    Right padding needs no attention mask: under causal attention real tokens never see the
    padding after them, and padded labels are ``CROSS_ENTROPY_IGNORE_IDX`` so they add nothing
    to the loss. Packed samples (with ``input_pos`` and ``seq_lens``, as ``PackedDataset``
    yields them) become one :class:`~torchtune.modules.attention.DocumentMask` over the
    flattened ``b * s`` tokens: the rows' document lengths, in order. Packed rows are usually
    all the same length; if not, a shorter row's padded columns are one more document, with
    positions from 0 like a packed row's own padding tail.

    Args:
        batch (Sequence[Mapping[str, Any]]): samples with ``tokens`` and ``labels`` (lists or
            1-D tensors of the same length) and optionally ``input_pos`` [s] and, for packed
            samples, ``seq_lens`` (document lengths summing to the sample's length).
        padding_idx (int): token id used for padding. Default 0.

    Returns:
        ``tokens`` [b, s] long, ``labels`` [b, s] long and, when the samples have them,
        ``input_pos`` [b, s] long and ``mask``, a ``DocumentMask`` whose lengths sum to
        ``b * s``.

    Raises:
        ValueError: on an empty batch, mismatched lengths, ``seq_lens`` that are not positive
            or do not sum to the sample's length, a mix of packed and unpacked samples, packed
            samples without ``input_pos``, or a sample with a dense ``mask`` (packed samples
            carry ``seq_lens`` instead).
    """
    if len(batch) == 0:
        raise ValueError("padded_collate got an empty batch")
    if any("mask" in s for s in batch):
        raise ValueError(
            "padded_collate got a sample with a 'mask'; packed samples carry their document "
            "lengths as 'seq_lens' (see PackedDataset)"
        )
    packed = ["seq_lens" in s for s in batch]
    if any(packed) and not all(packed):
        raise ValueError(
            "padded_collate got a mix of packed (with 'seq_lens') and unpacked samples"
        )
    if any(packed) and not all("input_pos" in s for s in batch):
        raise ValueError("padded_collate got packed samples without 'input_pos'")
    tokens = [torch.as_tensor(s["tokens"], dtype=torch.long) for s in batch]
    labels = [torch.as_tensor(s["labels"], dtype=torch.long) for s in batch]
    for i, (t, l) in enumerate(zip(tokens, labels)):
        if t.ndim != 1 or t.shape != l.shape:
            raise ValueError(
                f"sample {i} of the batch: tokens {tuple(t.shape)} and labels {tuple(l.shape)} "
                "must be 1-D and of the same length"
            )
    seq_len = max(t.numel() for t in tokens)
    out: Dict[str, Union[torch.Tensor, DocumentMask]] = {
        "tokens": _pad_stack(tokens, seq_len, padding_idx),
        "labels": _pad_stack(labels, seq_len, CROSS_ENTROPY_IGNORE_IDX),
    }
    if all("input_pos" in s for s in batch):
        positions: List[torch.Tensor] = []
        for s, t, is_packed in zip(batch, tokens, packed):
            pos = torch.as_tensor(s["input_pos"], dtype=torch.long)
            # A packed row's padded columns are a document of their own (positions restart);
            # an unpacked sample's positions just continue.
            start = 0 if is_packed or not pos.numel() else int(pos[-1]) + 1
            positions.append(torch.cat([pos, torch.arange(start, start + seq_len - t.numel())]))
        out["input_pos"] = torch.stack(positions)
    if packed[0]:
        lengths: List[int] = []
        for i, (s, t) in enumerate(zip(batch, tokens)):
            row = [int(n) for n in torch.as_tensor(s["seq_lens"], dtype=torch.long).tolist()]
            if any(n < 1 for n in row) or sum(row) != t.numel():
                raise ValueError(
                    f"sample {i} of the batch: seq_lens {row} must be positive and sum to its "
                    f"{t.numel()} tokens"
                )
            lengths += row
            if t.numel() < seq_len:
                lengths.append(seq_len - t.numel())
        out["mask"] = DocumentMask(tuple(lengths))
    return out


def _pad_stack(seqs: List[torch.Tensor], seq_len: int, value: int) -> torch.Tensor:
    out = torch.full((len(seqs), seq_len), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : s.numel()] = s
    return out
