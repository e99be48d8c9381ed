# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Token cross-entropy that never holds a whole batch's fp32 logits at once."""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX


def _chunk_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # [n, v] upcast here, per chunk: bf16 logits keep their precision in the log-softmax.
    return F.cross_entropy(
        logits.float(), labels, ignore_index=CROSS_ENTROPY_IGNORE_IDX, reduction="sum"
    )


class ChunkedCrossEntropyLoss(nn.Module):
    """Summed token cross-entropy and its token count, computed chunk by chunk.

    The sequence is split into ``num_chunks`` pieces; each piece is upcast to fp32, scored and
    dropped. With gradients on, each chunk runs under activation checkpointing, so backward
    recomputes its fp32 log-softmax instead of keeping every chunk's ``[b, s/k, vocab]`` fp32
    copy alive until then. Returning the sum and the count (rather than a mean) lets a recipe
    divide by the token count of a whole optimizer step, so gradient accumulation gives the
    big batch's gradient exactly. Labels equal to ``torchtune.data.CROSS_ENTROPY_IGNORE_IDX``
    are not scored (the one value the datasets write; not a setting).

    Args:
        num_chunks: pieces along the sequence (clamped to the sequence length).

    Raises:
        ValueError: if ``num_chunks`` is not positive.
    """

    def __init__(self, num_chunks: int = 8) -> None:
        super().__init__()
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        self.num_chunks = num_chunks

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            logits: ``[b, s, vocab]``, already aligned with ``labels`` (a recipe passes
                ``logits[:, :-1]`` with ``labels[:, 1:]``), any float dtype.
            labels: ``LongTensor[b, s]``; ``CROSS_ENTROPY_IGNORE_IDX`` entries are skipped.

        Returns:
            ``(loss_sum, num_tokens)``: fp32 scalar sum of the per-token losses and a long
            scalar count of the scored tokens.

        Raises:
            ValueError: if the shapes disagree.
        """
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
            raise ValueError(
                f"logits must be [b, s, vocab] and labels [b, s]; got {tuple(logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        num_tokens = (labels != CROSS_ENTROPY_IGNORE_IDX).sum()
        vocab = logits.shape[-1]
        total = logits.new_zeros((), dtype=torch.float32)
        use_ckpt = torch.is_grad_enabled() and logits.requires_grad
        for logit_chunk, label_chunk in zip(
            logits.chunk(self.num_chunks, dim=1), labels.chunk(self.num_chunks, dim=1)
        ):
            logit_chunk = logit_chunk.reshape(-1, vocab)  # [b * s_chunk, vocab]
            label_chunk = label_chunk.reshape(-1)
            if use_ckpt:
                total = total + checkpoint(
                    _chunk_ce_sum, logit_chunk, label_chunk, use_reentrant=False
                )
            else:
                total = total + _chunk_ce_sum(logit_chunk, label_chunk)
        return total, num_tokens
