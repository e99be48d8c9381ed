# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The training recipes' loss of one micro-batch: logits at ``t`` predict ``labels[:, t + 1]``."""
from typing import Dict, Tuple

import torch
from torch import nn

from torchtune.training._linear_ce import LinearCrossEntropyLoss


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
            labels, and has an ``ignore_index``; or a ``LinearCrossEntropyLoss``, which gets
            the ``[n, d]`` hidden states and ``model.output`` instead of logits.
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
    fused = isinstance(loss_fn, LinearCrossEntropyLoss)
    out = model(
        batch["tokens"],
        mask=batch.get("mask"),
        input_pos=batch.get("input_pos"),
        output_mask=scored,
        return_hidden=fused,
    )  # [n, vocab] logits, or [n, d] hidden states for the fused loss
    if fused:
        # Under FSDP the root module's weights (output among them) stay gathered after
        # forward (reshard_after_forward=False), so the projection can run here.
        return loss_fn(out, model.output, targets[scored])
    return loss_fn(out.unsqueeze(0), targets[scored].unsqueeze(0))
