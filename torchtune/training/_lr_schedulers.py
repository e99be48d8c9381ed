# Copyright (c) torchtune contributors. BSD-3-Clause license.
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def get_cosine_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warm-up from 0 to the optimizer's lr, then cosine decay.

    At step ``t`` the lr is ``lr * t / num_warmup_steps`` during warm-up, then
    ``lr * max(0, (1 + cos(2 pi * num_cycles * p)) / 2)`` with ``p`` the fraction of the
    post-warm-up steps done; ``num_cycles=0.5`` decays to 0 at ``num_training_steps``.

    Args:
        optimizer: its lr is the peak.
        num_warmup_steps: warm-up length in optimizer steps.
        num_training_steps: total optimizer steps (recipes fill this in).
        num_cycles: cosine periods over the decay (0.5: one half period).
        last_epoch: index of the last step taken; a resumed run passes ``steps_done - 1``.

    Returns:
        A ``LambdaLR`` to ``step()`` after every optimizer step.

    Raises:
        ValueError: on negative step counts.
    """
    if num_warmup_steps < 0 or num_training_steps < 0:
        raise ValueError(
            f"num_warmup_steps ({num_warmup_steps}) and num_training_steps "
            f"({num_training_steps}) must be >= 0"
        )

    def lr_lambda(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))

    return LambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)
