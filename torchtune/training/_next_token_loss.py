# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The training recipes' loss of one micro-batch: logits at ``t`` predict ``labels[:, t + 1]``."""

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules import TransformerDecoder
from torchtune.modules.attention import DocumentMask, worth_attending_by_document
from torchtune.training._linear_ce import LinearCrossEntropyLoss


def _documents(batch: Dict[str, Any]) -> Optional[torch.Tensor]:
    """``[b * s]`` document ids (increasing, unique over the batch), or None if attention is
    not causal within independent documents (a dense mask)."""
    mask = batch.get("mask")
    tokens = batch["tokens"]
    b, s = tokens.shape
    if mask is None:  # each row is one causal sequence
        return torch.arange(b, device=tokens.device).repeat_interleave(s)
    if not isinstance(mask, DocumentMask):
        return None
    if sum(mask.lengths) != b * s:
        raise ValueError(
            f"DocumentMask lengths sum to {sum(mask.lengths)}, expected b * s = {b * s}"
        )
    return mask.document_ids(tokens.device)


def drop_unscored_tails(
    batch: Dict[str, Any], scored: torch.Tensor
) -> Optional[Tuple[Dict[str, Any], torch.Tensor]]:
    """The batch as one row of documents, each cut after its last scored position.

    Under causal attention within a document, tokens after its last scored position (padding,
    or a packed row's padding tail, which is a document with nothing scored) reach no scored
    output, so dropping them leaves the loss and every gradient as they are while the model
    does no work on them.

    Args:
        batch: ``tokens`` ``[b, s]``, optionally ``mask`` (a ``DocumentMask`` over the
            ``b * s`` tokens: packed rows) and ``input_pos`` ``[b, s]``.
        scored: ``BoolTensor[b, s]``: positions whose output is scored.

    Returns:
        ``({"tokens", "input_pos"}: [1, n], "mask": DocumentMask)`` and ``keep`` ``[b * s]``
        (which flattened positions remain), or None where this does not apply: a dense mask,
        nothing to drop, nothing scored, or unmasked rows whose documents would be too short
        on average for per-document attention.

    Raises:
        ValueError: if a ``DocumentMask`` does not cover the ``b * s`` tokens.
    """
    docs = _documents(batch)
    if docs is None:
        return None
    tokens = batch["tokens"]
    b, s = tokens.shape
    flat_scored = scored.flatten()
    pos = torch.arange(b * s, device=tokens.device)
    last = torch.full((b * s,), -1, dtype=torch.long, device=tokens.device)
    last.scatter_reduce_(0, docs, torch.where(flat_scored, pos, -1), "amax")  # per document id
    keep = pos <= last[docs]  # [b * s]: a prefix of each document
    lengths = torch.unique_consecutive(docs[keep], return_counts=True)[1].tolist()  # sync
    n = sum(lengths)
    if not lengths or n == b * s:
        return None  # nothing scored, or nothing to drop: the batch runs as it is
    if batch.get("mask") is None and not worth_attending_by_document(n, len(lengths)):
        return None  # batched causal SDPA over the padded rows is cheaper
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
    model: nn.Module, loss_fn: nn.Module, batch: Dict[str, Any], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss of one micro-batch and the number of scored tokens.

    Only positions whose next label is scored (not ``CROSS_ENTROPY_IGNORE_IDX``) get logits
    (the model's ``output_mask``): prompt tokens under ``train_on_input=False``, padding and
    the last position skip the output projection. Same loss and gradients as scoring
    ``logits[:, :-1]`` in full, without the ``[b, s, vocab]`` logits or the slice's copy in
    backward. Tokens after the last scored position of each document (padding) are dropped
    before the model runs (:func:`drop_unscored_tails`), with the same result.

    Args:
        model: a ``TransformerDecoder`` (or an FSDP-wrapped one; the selection happens inside
            its forward, so the root module's hooks still run).
        loss_fn: returns ``(loss_sum, num_tokens)`` for ``[1, n, vocab]`` logits and ``[1, n]``
            labels (``ChunkedCrossEntropyLoss``); or a ``LinearCrossEntropyLoss``, which gets
            the ``[n, d]`` hidden states and ``model.output`` instead of logits.
        batch: ``tokens`` and ``labels`` ``[b, s]``, optionally ``input_pos`` ``[b, s]`` and
            ``mask``: packed rows' ``DocumentMask`` (what ``padded_collate`` gives them) or a
            ``BoolTensor[b, s, s]``.
        device: where the model is; tensors are moved there, a ``DocumentMask`` (plain
            Python lengths) is used as it is.

    Returns:
        ``(loss_sum, num_tokens)`` as scalar tensors.
    """
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels = batch["labels"]
    no_label = torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)
    targets = torch.cat([labels[:, 1:], no_label], dim=1)  # [b, s]: the label after t
    scored = targets != CROSS_ENTROPY_IGNORE_IDX
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
        # The model's final-logit cap (Gemma 2) goes with its projection.
        softcap = getattr(model, "output_softcap", None)
        return loss_fn(out, model.output, targets[scored], softcap=softcap)
    return loss_fn(out.unsqueeze(0), targets[scored].unsqueeze(0))
