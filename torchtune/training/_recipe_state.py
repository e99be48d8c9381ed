# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""What a fine-tuning recipe reads from its config for the loop, and the state it saves in
``recipe_state.pt`` to resume from (one layout for the single-device and distributed recipes,
so either resumes the other's run)."""

import logging
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional

import torch

log = logging.getLogger(__name__)

# The keys a checkpoint must hold to resume (beside the weights). "steps_in_epoch" is not
# among them: files written before it existed resume at an epoch start, as they did.
_REQUIRED_KEYS = (
    "epochs_run",
    "total_epochs",
    "max_steps_per_epoch",
    "seed",
    "global_step",
    "optimizer",
    "rng_state",
)


@dataclass(frozen=True)
class LoopSettings:
    """The loop's config keys, checked.

    Attributes:
        gradient_accumulation_steps: micro-batches per optimizer step.
        clip_grad_norm: max gradient norm over the trained parameters, or None.
        log_every_n_steps: metric-logging period in optimizer steps.
        resume: ``resume_from_checkpoint``.
    """

    gradient_accumulation_steps: int
    clip_grad_norm: Optional[float]
    log_every_n_steps: int
    resume: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "LoopSettings":
        """Read ``gradient_accumulation_steps``, ``clip_grad_norm``, ``log_every_n_steps``,
        ``resume_from_checkpoint`` (and check ``epochs``) from a recipe config.

        Raises:
            ValueError: if ``gradient_accumulation_steps``, ``epochs`` or
                ``log_every_n_steps`` is below 1.
        """
        for key in ("gradient_accumulation_steps", "epochs", "log_every_n_steps"):
            if int(cfg[key]) < 1:
                raise ValueError(f"Config key '{key}' must be >= 1, got {cfg[key]}")
        clip = cfg["clip_grad_norm"]
        return cls(
            gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]),
            clip_grad_norm=None if clip is None else float(clip),
            log_every_n_steps=int(cfg["log_every_n_steps"]),
            resume=bool(cfg["resume_from_checkpoint"]),
        )


@dataclass
class RecipeState:
    """Where a run stands: what ``recipe_state.pt`` stores besides the optimizer.

    Attributes:
        seed: the run's seed (the data order of every epoch derives from it).
        total_epochs: the configured ``epochs``.
        max_steps_per_epoch: the configured cap, or None.
        epochs_run: epochs finished.
        global_step: optimizer steps taken over the whole run.
        steps_in_epoch: optimizer steps taken in the current epoch (0 at an epoch's end,
            where the recipes save today; stored so a mid-epoch resume needs no new format).
    """

    seed: int
    total_epochs: int
    max_steps_per_epoch: Optional[int]
    epochs_run: int = 0
    global_step: int = 0
    steps_in_epoch: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], seed: int) -> "RecipeState":
        """A fresh run's state from ``epochs`` and ``max_steps_per_epoch``, with the seed the
        recipe settled on (``utils.set_seed``'s return value)."""
        max_steps = cfg["max_steps_per_epoch"]
        return cls(
            seed=int(seed),
            total_epochs=int(cfg["epochs"]),
            max_steps_per_epoch=None if max_steps is None else int(max_steps),
        )

    def end_step(self) -> None:
        self.global_step += 1
        self.steps_in_epoch += 1

    def end_epoch(self) -> None:
        self.epochs_run += 1
        self.steps_in_epoch = 0

    @property
    def finished(self) -> bool:
        return self.epochs_run >= self.total_epochs

    def state_dict(self, device: torch.device) -> Dict[str, Any]:
        """The state plus the RNG states to save: the CPU generator's, and on CUDA the
        current device's."""
        state = {
            "epochs_run": self.epochs_run,
            "total_epochs": self.total_epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "seed": self.seed,
            "global_step": self.global_step,
            "steps_in_epoch": self.steps_in_epoch,
            "rng_state": torch.get_rng_state(),
        }
        if device.type == "cuda":
            state["cuda_rng_state"] = torch.cuda.get_rng_state(device)
        return state

    def resumed_from(self, ckpt: Mapping[str, Any]) -> "RecipeState":
        """This run's state continued from a checkpoint's: seed, epochs run, global step
        and position from ``ckpt``, totals from this run's config (a change is warned about).

        Args:
            ckpt: what the checkpointer loaded (``recipe_state.pt``'s keys among others).

        Returns:
            A new state.

        Raises:
            ValueError: if ``ckpt`` lacks a key needed to resume (it names them).
        """
        missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
        if missing:
            raise ValueError(
                f"resume_from_checkpoint=True but the checkpoint lacks {missing}; resume from an "
                "intermediate checkpoint (recipe_state.pt, written after every epoch but the last)"
            )
        for key, ours in (
            ("total_epochs", self.total_epochs),
            ("max_steps_per_epoch", self.max_steps_per_epoch),
        ):
            if ckpt[key] != ours:
                log.warning("Resuming with %s=%s; the checkpoint has %s", key, ours, ckpt[key])
        return replace(
            self,
            seed=int(ckpt["seed"]),
            epochs_run=int(ckpt["epochs_run"]),
            global_step=int(ckpt["global_step"]),
            steps_in_epoch=int(ckpt.get("steps_in_epoch", 0)),
        )


def restore_rng_state(ckpt: Mapping[str, Any], device: torch.device) -> None:
    """Continue from the RNG states saved by :meth:`RecipeState.state_dict` (CUDA's only on
    CUDA, and only when the checkpoint has one). Call it last in setup: building the model
    draws from the generator."""
    torch.set_rng_state(ckpt["rng_state"])
    if device.type == "cuda" and "cuda_rng_state" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng_state"], device)
