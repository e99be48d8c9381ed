# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Sequence log-probabilities of a batch of chosen and rejected responses, in one forward."""

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules import TransformerDecoder
from torchtune.training._next_token_loss import drop_unscored_tails


def sequence_logps(
    model: nn.Module, batch: Dict[str, Any], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's scored tokens, and their counts.

    As in supervised training, logits at ``t`` score ``labels[:, t + 1]``, only the scored
    positions get logits (``output_mask``), and each row's tokens after its last scored one
    (padding) are dropped before the model runs, so the rows go through padding-free
    (:func:`~torchtune.training._next_token_loss.drop_unscored_tails`). The log-softmax is
    computed in fp32.

    Args:
        model: a ``TransformerDecoder`` (or a wrapper whose forward takes the same arguments).
        batch: ``tokens`` and ``labels`` ``[n, s]`` (a pair collate gives the ``b`` chosen rows
            then the ``b`` rejected ones, ``n = 2b``).
        device: where the model is.

    Returns:
        ``(logps, lengths)``: ``[n]`` fp32 sums of the scored tokens' log-probabilities, and
        ``[n]`` long counts of those tokens.
    """
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    n, s = tokens.shape
    no_label = torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)
    targets = torch.cat([labels[:, 1:], no_label], dim=1)  # [n, s]: the label after t
    scored = targets != CROSS_ENTROPY_IGNORE_IDX
    rows = torch.arange(n, device=device).repeat_interleave(s)[scored.flatten()]  # [m]
    picked = targets[scored]  # [m], in row-major order, which the unpadding keeps
    inputs = {"tokens": tokens, "mask": None, "input_pos": None}
    out_mask = scored
    if isinstance(model, TransformerDecoder):
        unpadded = drop_unscored_tails({"tokens": tokens}, scored)
        if unpadded is not None:
            inputs, keep = unpadded
            out_mask = scored.flatten()[keep].unsqueeze(0)
    logits = model(
        inputs["tokens"], mask=inputs["mask"], input_pos=inputs["input_pos"], output_mask=out_mask
    )  # [m, vocab]
    token_logps = -F.cross_entropy(logits.float(), picked, reduction="none")  # [m]
    logps = torch.zeros(n, device=device, dtype=torch.float32).index_add(0, rows, token_logps)
    return logps, scored.sum(dim=1)
