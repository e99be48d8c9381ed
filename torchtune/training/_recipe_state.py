# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""What a fine-tuning recipe reads from its config for the loop, and the state it saves in
``recipe_state.pt`` to resume from (one layout for the single-device and distributed recipes,
so either resumes the other's run)."""

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

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
        save_every_n_steps: write a step checkpoint every this many global steps (None: at
            epoch ends only).
    """

    gradient_accumulation_steps: int
    clip_grad_norm: Optional[float]
    log_every_n_steps: int
    resume: bool
    save_every_n_steps: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "LoopSettings":
        """Read ``gradient_accumulation_steps``, ``clip_grad_norm``, ``log_every_n_steps``,
        ``resume_from_checkpoint``, ``save_every_n_steps`` (optional; check ``epochs``,
        ``max_steps`` and ``keep_last_n_checkpoints`` too) from a recipe config.

        Raises:
            ValueError: if ``gradient_accumulation_steps``, ``epochs`` or
                ``log_every_n_steps`` is below 1, or ``save_every_n_steps``, ``max_steps``
                or ``keep_last_n_checkpoints`` is neither null nor >= 1.
        """
        for key in ("gradient_accumulation_steps", "epochs", "log_every_n_steps"):
            if int(cfg[key]) < 1:
                raise ValueError(f"Config key '{key}' must be >= 1, got {cfg[key]}")
        for key in ("save_every_n_steps", "max_steps", "keep_last_n_checkpoints"):
            if cfg.get(key) is not None and int(cfg[key]) < 1:
                raise ValueError(f"Config key '{key}' must be null or >= 1, got {cfg[key]}")
        clip, every = cfg["clip_grad_norm"], cfg.get("save_every_n_steps")
        return cls(
            gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]),
            clip_grad_norm=None if clip is None else float(clip),
            log_every_n_steps=int(cfg["log_every_n_steps"]),
            resume=bool(cfg["resume_from_checkpoint"]),
            save_every_n_steps=None if every is None else int(every),
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
        steps_in_epoch: optimizer steps taken in the current epoch (0 at an epoch's end; a
            step checkpoint resumes in the middle of the epoch).
        max_steps: the configured total of optimizer steps over all epochs, or None.
        signature: what a resumed run must match (:func:`run_signature`), once known.
        stopped: the run was already finished (resumed from its final checkpoint).
    """

    seed: int
    total_epochs: int
    max_steps_per_epoch: Optional[int]
    epochs_run: int = 0
    global_step: int = 0
    steps_in_epoch: int = 0
    max_steps: Optional[int] = None
    signature: Optional[Dict[str, Any]] = None
    stopped: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], seed: int) -> "RecipeState":
        """A fresh run's state from ``epochs``, ``max_steps_per_epoch`` and ``max_steps``
        (optional), with the seed the recipe settled on (``utils.set_seed``'s return value)."""
        per_epoch, total = cfg["max_steps_per_epoch"], cfg.get("max_steps")
        return cls(
            seed=int(seed),
            total_epochs=int(cfg["epochs"]),
            max_steps_per_epoch=None if per_epoch is None else int(per_epoch),
            max_steps=None if total is None else int(total),
        )

    def end_step(self) -> None:
        self.global_step += 1
        self.steps_in_epoch += 1

    def end_epoch(self) -> None:
        self.epochs_run += 1
        self.steps_in_epoch = 0

    @property
    def finished(self) -> bool:
        """All epochs run, ``max_steps`` reached, or resumed from the final checkpoint."""
        at_max = self.max_steps is not None and self.global_step >= self.max_steps
        return self.stopped or at_max or self.epochs_run >= self.total_epochs

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run (the lr schedule's length)."""
        total = self.total_epochs * steps_per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)

    def remaining_epochs(self) -> Iterator[int]:
        """The 0-based epochs left to run; stops early once :attr:`finished`."""
        epoch = self.epochs_run
        while not self.finished and epoch < self.total_epochs:
            yield epoch
            epoch = self.epochs_run

    def epoch_steps(self, steps_per_epoch: int) -> int:
        """Where the current epoch stops: its last step, or earlier at ``max_steps``."""
        if self.max_steps is None:
            return steps_per_epoch
        return min(steps_per_epoch, self.steps_in_epoch + self.max_steps - self.global_step)

    def close_epoch(self, steps_per_epoch: int) -> None:
        """Count the epoch as run if all its steps were taken (``max_steps`` may stop it
        earlier: then the run ends mid-epoch)."""
        if self.steps_in_epoch >= steps_per_epoch:
            self.end_epoch()

    def step_checkpoint_due(self, every: Optional[int], steps_per_epoch: int) -> bool:
        """Whether to write ``step_N`` now: every ``every`` global steps, except where the
        epoch's end or the run's end writes a checkpoint anyway."""
        if every is None or self.global_step % every != 0 or self.finished:
            return False
        return self.steps_in_epoch < steps_per_epoch

    @property
    def checkpoint_name(self) -> str:
        """``epoch_N`` at an epoch's end (N epochs run), else ``step_N`` (N global steps)."""
        if self.steps_in_epoch == 0:
            return f"epoch_{self.epochs_run}"
        return f"step_{self.global_step}"

    def checkpoint_info(self) -> Dict[str, Any]:
        """The checkpoints.json entry's position and signature fields."""
        return {
            "global_step": self.global_step,
            "epochs_run": self.epochs_run,
            "steps_in_epoch": self.steps_in_epoch,
            **(self.signature or {}),
        }

    def state_dict(self, device: torch.device) -> Dict[str, Any]:
        """The state plus the RNG states to save: the CPU generator's, and on CUDA the
        current device's; under torch.distributed every rank's too (``rank_rng_states``:
        ranks draw differently, e.g. dropout over batches of other lengths), so every rank
        must call this."""
        state = {
            "epochs_run": self.epochs_run,
            "total_epochs": self.total_epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "seed": self.seed,
            "global_step": self.global_step,
            "steps_in_epoch": self.steps_in_epoch,
            "rng_state": torch.get_rng_state(),
        }
        if self.signature is not None:
            state["run_signature"] = dict(self.signature)
        if _world_size() > 1:
            ours = (state["rng_state"], state.get("cuda_rng_state"))
            per_rank = [None] * _world_size()
            torch.distributed.all_gather_object(per_rank, ours)
            state["rank_rng_states"] = [
                {"rng_state": cpu, "cuda_rng_state": cuda} for cpu, cuda in per_rank
            ]
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
        done = ckpt.get("finished_checkpoint")
        if done is not None:  # the latest checkpoint is the run's last: nothing to resume
            log.info(
                "The run in this output_dir is finished (its latest checkpoint %s is final): "
                "nothing to do",
                done["name"],
            )
            return replace(
                self,
                epochs_run=int(done.get("epochs_run", self.total_epochs)),
                global_step=int(done.get("global_step", 0)),
                steps_in_epoch=int(done.get("steps_in_epoch", 0)),
                stopped=True,
            )
        missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
        if missing:
            raise ValueError(
                f"resume_from_checkpoint=True but the checkpoint lacks {missing}; resume from an "
                "intermediate checkpoint (NAME_state/recipe_state.pt, written with every "
                "checkpoint but the run's last)"
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


def run_signature(cfg: Mapping[str, Any], dataset: Any, world_size: int = 1) -> Dict[str, Any]:
    """What a resumed run must share with the run it resumes to see the same batches: the
    global batch (``world_size`` x ``batch_size``, both recorded), gradient accumulation and
    the dataset (its length and a sha256 of its resolved config node, keys sorted).

    Args:
        cfg: the recipe config (``dataset``, ``batch_size``, ``gradient_accumulation_steps``).
        dataset: the built dataset (``len``).
        world_size: number of ranks.
    """
    node = cfg["dataset"]
    if isinstance(node, DictConfig):  # key order is not meaning: a rewritten YAML still resumes
        text = json.dumps(OmegaConf.to_container(node, resolve=True), sort_keys=True, default=str)
    else:
        text = repr(node)
    return {
        "world_size": int(world_size),
        "batch_size": int(cfg["batch_size"]),
        "gradient_accumulation_steps": int(cfg["gradient_accumulation_steps"]),
        "dataset": {
            "len": len(dataset),
            "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        },
    }


def check_resume_signature(ckpt: Mapping[str, Any], signature: Mapping[str, Any]) -> None:
    """Refuse to resume a run whose batches would differ from the checkpoint's run.

    Args:
        ckpt: what the checkpointer loaded (``run_signature`` is in recipe state written since
            step checkpoints exist; older files are resumed unchecked).
        signature: this run's :func:`run_signature`.

    Raises:
        ValueError: naming each differing key with the checkpoint's and this run's value.
    """
    saved = ckpt.get("run_signature")
    if saved is None or ckpt.get("finished_checkpoint") is not None:
        return
    diffs = []
    # The global batch, not the rank count: W ranks of b/W samples draw exactly the
    # batches of one device with b (build_dataloader), so either resumes the other.
    theirs_global = saved["world_size"] * saved["batch_size"]
    ours_global = signature["world_size"] * signature["batch_size"]
    if theirs_global != ours_global:
        diffs.append(
            f"world_size x batch_size: the checkpoint has {saved['world_size']} x "
            f"{saved['batch_size']}, this run {signature['world_size']} x "
            f"{signature['batch_size']}"
        )
    key = "gradient_accumulation_steps"
    if saved[key] != signature[key]:
        diffs.append(f"{key}: the checkpoint has {saved[key]}, this run {signature[key]}")
    if saved["dataset"] != signature["dataset"]:
        diffs.append(
            f"dataset: the checkpoint's has {saved['dataset']['len']} samples and config hash "
            f"{saved['dataset']['config_sha256'][:12]}, this run's {signature['dataset']['len']} "
            f"and {signature['dataset']['config_sha256'][:12]}"
        )
    if diffs:
        raise ValueError(
            "resume_from_checkpoint=True but this run would not see the same batches as the "
            "run it resumes: " + "; ".join(diffs) + ". Resume with the same settings, or start "
            "a new run in another output_dir"
        )


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def restore_rng_state(ckpt: Mapping[str, Any], device: torch.device) -> None:
    """Continue from the RNG states saved by :meth:`RecipeState.state_dict` (CUDA's only on
    CUDA, and only when the checkpoint has one): this rank's own when the checkpoint has one
    per rank of a run with as many ranks, else rank 0's. Call it last in setup: building the
    model draws from the generator. Nothing to restore for a finished run."""
    if "rng_state" not in ckpt:
        return
    per_rank = ckpt.get("rank_rng_states")
    if per_rank is not None and len(per_rank) == _world_size():  # each rank its own
        ckpt = {k: v for k, v in per_rank[_rank()].items() if v is not None}
    torch.set_rng_state(ckpt["rng_state"])
    if device.type == "cuda" and "cuda_rng_state" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng_state"], device)
