# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pieces the training recipes share: the loss and the lr schedule."""
from torchtune.training._loss import ChunkedCrossEntropyLoss
from torchtune.training._lr_schedulers import get_cosine_schedule_with_warmup

__all__ = ["ChunkedCrossEntropyLoss", "get_cosine_schedule_with_warmup"]
