# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pieces the training recipes share: the loss, the next-token loss of a batch, the lr schedule."""

from torchtune.training._linear_ce import LinearCrossEntropyLoss
from torchtune.training._loss import ChunkedCrossEntropyLoss
from torchtune.training._lr_schedulers import get_cosine_schedule_with_warmup
from torchtune.training._next_token_loss import next_token_loss_sum

__all__ = [
    "ChunkedCrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "get_cosine_schedule_with_warmup",
    "next_token_loss_sum",
]
