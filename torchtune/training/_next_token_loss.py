# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The training recipes' loss of one micro-batch: logits at ``t`` predict ``labels[:, t + 1]``."""
from typing import Dict, Tuple

import torch
from torch import nn


def next_token_loss_sum(
    model: nn.Module, loss_fn: nn.Module, batch: Dict[str, torch.Tensor], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss of one micro-batch and the number of scored tokens.

    Only positions whose next label is scored get logits (the model's ``output_mask``): prompt
    tokens under ``train_on_input=False``, padding and the last position skip the output
    projection. Same loss and gradients as scoring ``logits[:, :-1]`` in full, without the
    ``[b, s, vocab]`` logits or the slice's copy in backward.

    Args:
        model: a ``TransformerDecoder`` (or an FSDP-wrapped one; the selection happens inside
            its forward, so the root module's hooks still run).
        loss_fn: returns ``(loss_sum, num_tokens)`` for ``[1, n, vocab]`` logits and ``[1, n]``
            labels, and has an ``ignore_index``.
        batch: ``tokens`` and ``labels`` ``[b, s]``, optionally ``mask`` ``[b, s, s]`` and
            ``input_pos`` ``[b, s]`` (packed rows).
        device: where the model is.

    Returns:
        ``(loss_sum, num_tokens)`` as scalar tensors.
    """
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["labels"]
    no_label = torch.full_like(labels[:, :1], loss_fn.ignore_index)
    targets = torch.cat([labels[:, 1:], no_label], dim=1)  # [b, s]: the label after t
    scored = targets != loss_fn.ignore_index
    logits = model(
        batch["tokens"],
        mask=batch.get("mask"),
        input_pos=batch.get("input_pos"),
        output_mask=scored,
    )  # [n, vocab]
    return loss_fn(logits.unsqueeze(0), targets[scored].unsqueeze(0))
