# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The run's progress bar and metric rows."""

from typing import Any, Dict, Optional

from tqdm import tqdm

from torchtune import utils


class StepLog:
    """A tqdm bar (elapsed time, ETA, loss, lr, tokens/s), and a metric-logger row every
    ``log_every_n_steps`` steps: ``loss``, ``lr``, ``tokens_per_second`` and
    ``peak_memory_gib``. Tokens are those :func:`count_tokens` counts: labels not ignored,
    so no padding.

    Args:
        metric_logger: has ``log_dict(dict, step=)``; None logs nothing (ranks but 0).
        log_every_n_steps: logging period, in global steps.
        device: whose peak memory is logged.
        num_steps: the bar's length (an epoch's steps, or the run's with ``initial``).
        desc: the bar's label (:meth:`set_description` changes it).
        show: draw the bar (False on ranks but 0).
        initial: steps already done (a resumed run), so the ETA counts only what is left.
    """

    def __init__(
        self,
        metric_logger: Optional[Any],
        log_every_n_steps: int,
        device: Any,
        num_steps: int,
        desc: str,
        show: bool = True,
        initial: int = 0,
    ) -> None:
        self._metric_logger = metric_logger
        self._every = log_every_n_steps
        self._device = device
        self._pbar = tqdm(total=num_steps, desc=desc, disable=not show, initial=initial)

    def set_description(self, desc: str) -> None:
        self._pbar.set_description(desc)

    def step(
        self,
        global_step: int,
        loss: float,
        lr: float,
        tokens: int,
        seconds: float,
        extra: Optional[Dict[str, float]] = None,
    ) -> None:
        """Record one optimizer step (``tokens`` over ``seconds``, all ranks together);
        ``extra`` metrics (a preference recipe's rewards, or validation's ``val_loss``) join
        the row. A row whose ``extra`` has ``val_loss`` is logged even between the logging
        period's steps, so no validation result is dropped."""
        tokens_per_second = tokens / max(seconds, 1e-9)
        self._pbar.update(1)
        self._pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}")
        # tqdm's own rate/ETA include the step's dataloading; ours is the step alone.
        validated = extra is not None and "val_loss" in extra
        if self._metric_logger is not None and (global_step % self._every == 0 or validated):
            mem = utils.get_memory_stats(self._device)
            self._metric_logger.log_dict(
                {
                    "loss": loss,
                    "lr": lr,
                    "tokens_per_second": tokens_per_second,
                    "peak_memory_gib": mem["peak_memory_gib"],
                    **(extra or {}),
                },
                step=global_step,
            )

    def close(self) -> None:
        self._pbar.close()
