# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The recipe kit: the loss, the next-token loss of a batch, the lr schedule, the loop's
settings and saved state, the data loader, one optimizer step and its out-of-memory retry,
progress logging, the validation loss."""

from torchtune.training._data import (
    build_dataloader,
    count_tokens,
    epoch_micro_batches,
    steps_per_epoch,
)
from torchtune.training._linear_ce import LinearCrossEntropyLoss
from torchtune.training._loss import ChunkedCrossEntropyLoss
from torchtune.training._lr_schedulers import get_cosine_schedule_with_warmup
from torchtune.training._model_folder import tokenizer_output_files, training_chat_template
from torchtune.training._next_token_loss import next_token_loss_sum
from torchtune.training._oom import OomRetry, StepOutOfMemory, is_out_of_memory, split_batch
from torchtune.training._progress import StepLog
from torchtune.training._recipe_state import (
    LoopSettings,
    RecipeState,
    check_resume_signature,
    restore_rng_state,
    run_signature,
)
from torchtune.training._setup import (
    build_checkpointer,
    build_lr_scheduler,
    configure_cuda_allocator,
    init_device,
    init_distributed_device,
    load_checkpoint_on_rank_zero,
)
from torchtune.training._step import optimizer_step
from torchtune.training._validation import (
    Validator,
    build_validation_dataloader,
    validation_dataset_config,
    validation_loss,
)

__all__ = [
    "ChunkedCrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "LoopSettings",
    "OomRetry",
    "RecipeState",
    "StepLog",
    "StepOutOfMemory",
    "Validator",
    "build_checkpointer",
    "build_dataloader",
    "build_lr_scheduler",
    "build_validation_dataloader",
    "check_resume_signature",
    "configure_cuda_allocator",
    "count_tokens",
    "epoch_micro_batches",
    "get_cosine_schedule_with_warmup",
    "init_device",
    "init_distributed_device",
    "is_out_of_memory",
    "load_checkpoint_on_rank_zero",
    "next_token_loss_sum",
    "optimizer_step",
    "restore_rng_state",
    "run_signature",
    "split_batch",
    "steps_per_epoch",
    "tokenizer_output_files",
    "training_chat_template",
    "validation_dataset_config",
    "validation_loss",
]
