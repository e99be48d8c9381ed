# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The training recipes' loss of one micro-batch: logits at ``t`` predict ``labels[:, t + 1]``."""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from torchtune.modules import TransformerDecoder
from torchtune.modules.attention import (
    DocumentMask,
    block_causal_documents,
    worth_attending_by_document,
)
from torchtune.training._linear_ce import LinearCrossEntropyLoss


def _documents(batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """``[b, s]`` document ids (unique over the batch), or None if attention is not causal
    within independent documents."""
    mask = batch.get("mask")
    tokens = batch["tokens"]
    if mask is None:  # each row is one causal sequence
        b, s = tokens.shape
        return torch.arange(b, device=tokens.device).unsqueeze(1).expand(b, s)
    if mask.dim() != 3 or mask.dtype != torch.bool:
        return None
    return block_causal_documents(mask)


def drop_unscored_tails(
    batch: Dict[str, torch.Tensor], scored: torch.Tensor
) -> Optional[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
    """The batch as one row of documents, each cut after its last scored position.

    Under causal attention within a document, tokens after its last scored position (padding,
    or a packed row's padding tail, which is a document with nothing scored) reach no scored
    output, so dropping them leaves the loss and every gradient as they are while the model
    does no work on them.

    Args:
        batch: ``tokens`` ``[b, s]``, optionally ``mask`` ``[b, s, s]`` (block-causal) and
            ``input_pos`` ``[b, s]``.
        scored: ``BoolTensor[b, s]``: positions whose output is scored.

    Returns:
        ``({"tokens", "input_pos"}: [1, n], "mask": DocumentMask)`` and ``keep`` ``[b * s]``
        (which flattened positions remain), or None where this does not apply: a mask that is
        not block-causal, nothing to drop in unmasked rows, or documents too short on average
        for per-document attention.
    """
    docs = _documents(batch)
    if docs is None:
        return None
    tokens = batch["tokens"]
    b, s = tokens.shape
    docs, flat_scored = docs.flatten(), scored.flatten()
    pos = torch.arange(b * s, device=tokens.device)
    last = torch.full((b * s,), -1, dtype=torch.long, device=tokens.device)
    last.scatter_reduce_(0, docs, torch.where(flat_scored, pos, -1), "amax")  # per document id
    keep = pos <= last[docs]  # [b * s]: a prefix of each document
    lengths = torch.unique_consecutive(docs[keep], return_counts=True)[1].tolist()  # sync
    n = sum(lengths)
    if not lengths or not worth_attending_by_document(n, len(lengths)):
        return None
    if batch.get("mask") is None and n == b * s:
        return None  # batched causal SDPA over the rows as they are is cheaper
    input_pos = batch.get("input_pos")
    if input_pos is None:
        input_pos = torch.arange(s, device=tokens.device).expand(b, s)
    flat = {
        "tokens": tokens.flatten()[keep].unsqueeze(0),
        "input_pos": input_pos.flatten()[keep].unsqueeze(0),
        "mask": DocumentMask(tuple(lengths)),
    }
    return flat, keep


def next_token_loss_sum(
    model: nn.Module, loss_fn: nn.Module, batch: Dict[str, torch.Tensor], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss of one micro-batch and the number of scored tokens.

    Only positions whose next label is scored get logits (the model's ``output_mask``): prompt
    tokens under ``train_on_input=False``, padding and the last position skip the output
    projection. Same loss and gradients as scoring ``logits[:, :-1]`` in full, without the
    ``[b, s, vocab]`` logits or the slice's copy in backward. Tokens after the last scored
    position of each document (padding) are dropped before the model runs
    (:func:`drop_unscored_tails`), with the same result.

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
    inputs = {k: batch.get(k) for k in ("tokens", "mask", "input_pos")}
    if isinstance(model, TransformerDecoder) and not model.caches_are_enabled():
        unpadded = drop_unscored_tails(batch, scored)
        if unpadded is not None:
            inputs, keep = unpadded
            targets = targets.flatten()[keep].unsqueeze(0)  # [1, n]
            scored = scored.flatten()[keep].unsqueeze(0)
    out = model(
        inputs["tokens"],
        mask=inputs["mask"],
        input_pos=inputs["input_pos"],
        output_mask=scored,
        return_hidden=fused,
    )  # [n, vocab] logits, or [n, d] hidden states for the fused loss
    if fused:
        # Under FSDP the root module's weights (output among them) stay gathered after
        # forward (reshard_after_forward=False), so the projection can run here.
        return loss_fn(out, model.output, targets[scored])
    return loss_fn(out.unsqueeze(0), targets[scored].unsqueeze(0))
