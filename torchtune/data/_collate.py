# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Batch samples into padded tensors."""

from typing import Any, Dict, List, Mapping, Sequence

import torch

from torchtune.data._common import CROSS_ENTROPY_IGNORE_IDX


def padded_collate(
    batch: Sequence[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
) -> Dict[str, torch.Tensor]:
    """Right-pad a list of samples to the longest one and stack them.

    Right padding needs no attention mask: under causal attention real tokens never see the
    padding after them, and padded labels are ``ignore_idx`` so they add nothing to the loss.
    Packed samples (with ``input_pos`` and ``mask``) are usually all the same length; if not,
    padded positions continue counting and attend only to themselves.

    Args:
        batch (Sequence[Mapping[str, Any]]): samples with ``tokens`` and ``labels`` (lists or
            1-D tensors of the same length) and optionally ``input_pos`` [s] and ``mask`` [s, s].
        padding_idx (int): token id used for padding. Default 0.
        ignore_idx (int): label used for padding. Default -100.

    Returns:
        Dict[str, torch.Tensor]: ``tokens`` [b, s] long, ``labels`` [b, s] long and, when the
        samples have them, ``input_pos`` [b, s] long and ``mask`` [b, s, s] bool.

    Raises:
        ValueError: on an empty batch, mismatched lengths, or a mix of packed and unpacked samples.
    """
    if len(batch) == 0:
        raise ValueError("padded_collate got an empty batch")
    packed = ["mask" in s for s in batch]
    if any(packed) and not all(packed):
        raise ValueError("padded_collate got a mix of packed (with 'mask') and unpacked samples")
    tokens = [torch.as_tensor(s["tokens"], dtype=torch.long) for s in batch]
    labels = [torch.as_tensor(s["labels"], dtype=torch.long) for s in batch]
    for i, (t, l) in enumerate(zip(tokens, labels)):
        if t.ndim != 1 or t.shape != l.shape:
            raise ValueError(
                f"sample {i} of the batch: tokens {tuple(t.shape)} and labels {tuple(l.shape)} "
                "must be 1-D and of the same length"
            )
    seq_len = max(t.numel() for t in tokens)
    out = {
        "tokens": _pad_stack(tokens, seq_len, padding_idx),
        "labels": _pad_stack(labels, seq_len, ignore_idx),
    }
    if all("input_pos" in s for s in batch):
        positions: List[torch.Tensor] = []
        for s, t in zip(batch, tokens):
            pos = torch.as_tensor(s["input_pos"], dtype=torch.long)
            start = int(pos[-1]) + 1 if pos.numel() else 0
            positions.append(torch.cat([pos, torch.arange(start, start + seq_len - t.numel())]))
        out["input_pos"] = torch.stack(positions)
    if packed[0]:
        masks = []
        for s, t in zip(batch, tokens):
            m = torch.as_tensor(s["mask"], dtype=torch.bool)
            n = t.numel()
            if m.shape != (n, n):
                raise ValueError(f"mask of shape {tuple(m.shape)} does not match {n} tokens")
            # Padding attends only to itself, so no row of the mask is all False (SDPA -> NaN).
            full = torch.eye(seq_len, dtype=torch.bool)
            full[:n, :n] = m
            masks.append(full)
        out["mask"] = torch.stack(masks)
    return out


def _pad_stack(seqs: List[torch.Tensor], seq_len: int, value: int) -> torch.Tensor:
    out = torch.full((len(seqs), seq_len), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : s.numel()] = s
    return out
