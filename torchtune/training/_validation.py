# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Validation loss during fine-tuning: the config keys, the loader, the loss over a split.

Config keys (top level, all optional):

- ``validation_dataset``: a dataset node. With a ``_component_`` it is built as it is (any
  dataset builder); without one, its keys override the training ``dataset`` node's, e.g.
  ``validation_dataset: {split: "train[90%:]"}`` (the same source, another slice; give the
  training ``dataset`` the complementary ``split: "train[:90%]"``) or
  ``validation_dataset: {data_files: val.json}``. Absent or null: no validation.
- ``eval_every_n_steps``: validate after every N-th optimizer step (global steps, as logged).
  Null (the default): at the end of each epoch (after its last step).
- ``validation_batch_size``: samples per forward on each rank; default ``batch_size``.
"""

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from torchtune import config, utils
from torchtune.data import padded_collate, padding_id
from torchtune.training._next_token_loss import next_token_loss_sum
from torchtune.training._recipe_state import RecipeState

log = logging.getLogger(__name__)

_GLOB_CHARS = ("*", "?", "[")
_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")


class _ShardSampler(Sampler[int]):
    """Samples ``rank, rank + world_size, ...`` of ``range(n)``, in order, each exactly once
    over all ranks (``DistributedSampler`` pads the ranks to equal length with repeats, which
    would count those samples twice in a mean)."""

    def __init__(self, n: int, world_size: int, rank: int) -> None:
        self.n, self.world_size, self.rank = n, world_size, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def build_validation_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    pad_id: int,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """This rank's share of the validation split as right-padded batches, in dataset order.

    The ranks' shares are disjoint and together hold every sample once (no padding repeats),
    so their loss sums add up to the whole split's. Ranks may get different numbers of
    batches; :func:`validation_loss` evens out the forwards.

    Args:
        dataset: map-style dataset of ``{"tokens", "labels"}`` samples.
        batch_size: samples per batch on this rank.
        pad_id: the id to pad with, ``torchtune.data.padding_id(tokenizer)``.
        world_size: number of ranks.
        rank: this rank.

    Returns:
        The loader. It has its own generator, so iterating it draws nothing from the global
        RNG (a plain ``DataLoader`` draws a seed from it on every ``iter``).

    Raises:
        ValueError: if ``batch_size`` is below 1 or the dataset is empty.
    """
    if batch_size < 1:
        raise ValueError(f"validation_batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("validation_dataset has no samples")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_ShardSampler(len(dataset), world_size, rank),
        collate_fn=partial(padded_collate, padding_idx=pad_id),
        generator=torch.Generator(),
    )


def validation_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: DataLoader,
    device: torch.device,
    world_size: int = 1,
) -> Dict[str, float]:
    """Token-weighted mean next-token loss over every batch of ``loader`` (on all ranks).

    The loss is the training loss's (:func:`next_token_loss_sum`): the sum of token losses
    over the whole split divided by the number of scored tokens, both summed over ranks, so
    it does not depend on the batch size, the padding or the number of ranks. The model runs
    in eval mode under ``torch.no_grad`` and gets its mode back; eval mode turns dropout off
    (LoRA's ``lora_dropout`` included), so the loss is the deterministic one. The CPU (and
    on CUDA the device's) RNG state is saved and restored, so the training draws (dropout,
    the next epoch's data order) are the same as without validation.

    Every rank must call this: under FSDP each forward is collective, so a rank with fewer
    batches runs extra forwards whose results are dropped.

    Args:
        model: the model (FSDP-sharded when ``world_size > 1``).
        loss_fn: the recipe's loss (see :func:`next_token_loss_sum`).
        loader: this rank's batches (:func:`build_validation_dataloader`); each has
            ``tokens`` and ``labels`` ``[b, s]``.
        device: where the model is.
        world_size: number of ranks.

    Returns:
        ``{"val_loss", "val_perplexity", "val_tokens"}``: the mean token loss, its ``exp``,
        and the number of scored tokens over all ranks. A CPU-GPU sync point.

    Raises:
        ValueError: if the split has no scored token.
    """
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss_sum, num_tokens = _loss_sum(model, loss_fn, loader, device, world_size)
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
    if num_tokens == 0:
        raise ValueError("validation_dataset has no scored tokens (every label is ignored)")
    loss = loss_sum / num_tokens
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(loss) if loss < 700 else math.inf,
        "val_tokens": num_tokens,
    }


def _loss_sum(
    model: nn.Module, loss_fn: nn.Module, loader: DataLoader, device: torch.device, world_size: int
) -> Tuple[float, int]:
    n_forwards = len(loader)
    if world_size > 1:
        t = torch.tensor([n_forwards], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_forwards = int(t.item())
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    batch = None
    for batch in loader:
        loss_sum, num_tokens = next_token_loss_sum(model, loss_fn, batch, device)
        total += loss_sum.double()
        count += num_tokens
    if n_forwards > len(loader):  # only on N ranks: keep this rank in step with the busiest
        if batch is None:  # an empty share: any sample will do
            batch = loader.collate_fn([loader.dataset[0]])
        for _ in range(n_forwards - len(loader)):
            next_token_loss_sum(model, loss_fn, batch, device)
    if world_size == 1:
        return total.item(), int(count.item())
    loss_sum, num_tokens = utils.all_reduce_sum([total.item(), int(count.item())], device).tolist()
    return loss_sum, int(num_tokens)


def validation_dataset_config(cfg: Mapping[str, Any]) -> Optional[DictConfig]:
    """The dataset node ``validation_dataset`` stands for, or None without one.

    A node with a ``_component_`` is used as it is; one without is merged over the training
    ``dataset`` node (its keys win).

    Raises:
        ValueError: if ``validation_dataset`` is not a mapping.
    """
    node = cfg.get("validation_dataset")
    if node is None:
        return None
    if not isinstance(node, (DictConfig, dict)):
        raise ValueError(
            "validation_dataset must be a dataset node (with _component_) or keys overriding "
            f"the training dataset's (e.g. {{split: 'train[90%:]'}}), got {node!r}"
        )
    if "_component_" in node:
        return node
    # Resolved first: the merged node is a new root, where ${...} would not resolve.
    return OmegaConf.merge(_resolved(cfg["dataset"]), _resolved(node))


def _resolved(node: Any) -> Dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _check_local_files(node: DictConfig, own_keys: Any, key: str) -> None:
    """A missing local data file raises here, naming the config key that gives it, rather
    than deep inside ``datasets``."""
    for name in ("data_files", "source"):
        value = node.get(name)
        if value is None:
            continue
        where = f"{key}.{name}" if name in own_keys else f"dataset.{name} (inherited by {key})"
        paths = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        for path in paths:
            path = str(path)
            if name == "source" and not path.lower().endswith(_LOCAL_SUFFIXES):
                continue  # a Hub id or a builder name
            if "://" in path or any(c in path for c in _GLOB_CHARS):
                continue
            if not Path(path).expanduser().exists():
                raise FileNotFoundError(f"{where}: no file at '{path}'")


class Validator:
    """When to validate and the loader to do it with, from the config keys (see the module
    docstring); inert (:meth:`maybe_run` returns None) without a ``validation_dataset``.

    Args:
        loader: this rank's validation batches, or None (no validation).
        every_n_steps: validate when ``global_step % every_n_steps == 0``; None: after the
            last step of each epoch.
        steps_per_epoch: optimizer steps per epoch (when an epoch ends).
        device: where the model is.
        world_size: number of ranks.
    """

    def __init__(
        self,
        loader: Optional[DataLoader],
        *,
        every_n_steps: Optional[int],
        steps_per_epoch: int,
        device: torch.device,
        world_size: int = 1,
    ) -> None:
        self.loader = loader
        self.every_n_steps = every_n_steps
        self.steps_per_epoch = steps_per_epoch
        self.device = device
        self.world_size = world_size

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any],
        tokenizer: Any,
        *,
        steps_per_epoch: int,
        device: torch.device,
        world_size: int = 1,
        rank: int = 0,
    ) -> "Validator":
        """Read ``validation_dataset``, ``eval_every_n_steps`` and ``validation_batch_size``
        and build this rank's loader.

        Raises:
            ValueError: if ``eval_every_n_steps`` or ``validation_batch_size`` is below 1,
                ``eval_every_n_steps`` is set without a ``validation_dataset``, or the
                validation dataset does not build (the message names the key).
            FileNotFoundError: if a local file the validation dataset reads is missing.
        """
        every = cfg.get("eval_every_n_steps")
        if every is not None and int(every) < 1:
            raise ValueError(f"Config key 'eval_every_n_steps' must be >= 1 or null, got {every}")
        node = validation_dataset_config(cfg)
        if node is None:
            if every is not None:
                raise ValueError(
                    f"eval_every_n_steps={every} but the config has no validation_dataset"
                )
            return cls(None, every_n_steps=None, steps_per_epoch=steps_per_epoch, device=device)
        _check_local_files(node, list(cfg["validation_dataset"].keys()), "validation_dataset")
        # Building it must not move the training RNG (a run with validation draws the same
        # dropout masks and data orders as one without).
        rng_devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                dataset = config.instantiate(node, tokenizer=tokenizer)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"validation_dataset: {e}") from e
        # config.InstantiationError is a ValueError; a key the builder passes on to
        # datasets.load_dataset that it does not know is a TypeError there.
        except (ValueError, TypeError) as e:
            raise ValueError(f"validation_dataset: {e}") from e
        batch_size = cfg.get("validation_batch_size")
        if batch_size is None:
            batch_size = cfg["batch_size"]
        loader = build_validation_dataloader(
            dataset,
            batch_size=int(batch_size),
            pad_id=padding_id(tokenizer),
            world_size=world_size,
            rank=rank,
        )
        log.info(
            "Validation: %d samples, %d batches of %d on rank %d, every %s",
            len(dataset),
            len(loader),
            int(batch_size),
            rank,
            f"{every} steps" if every is not None else "epoch",
        )
        return cls(
            loader,
            every_n_steps=None if every is None else int(every),
            steps_per_epoch=steps_per_epoch,
            device=device,
            world_size=world_size,
        )

    def due(self, state: RecipeState) -> bool:
        """Whether to validate now, after the step that brought the run to ``state``
        (its ``global_step`` and ``steps_in_epoch``)."""
        if self.loader is None:
            return False
        if self.every_n_steps is None:
            return state.steps_in_epoch == self.steps_per_epoch
        return state.global_step % self.every_n_steps == 0

    def maybe_run(
        self, model: nn.Module, loss_fn: nn.Module, state: RecipeState
    ) -> Optional[Dict[str, float]]:
        """:func:`validation_loss` when :meth:`due`, else None (call it after
        ``state.end_step()``). Every rank must call this."""
        if not self.due(state):
            return None
        metrics = validation_loss(model, loss_fn, self.loader, self.device, self.world_size)
        log.info(
            "Step %d: val_loss %.4f, val_perplexity %.3f over %d tokens",
            state.global_step,
            metrics["val_loss"],
            metrics["val_perplexity"],
            metrics["val_tokens"],
        )
        return metrics
