# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Full fine-tuning on several devices with FSDP2, launched through torchrun.

    tune --nnodes 1 --nproc_per_node 2 full_finetune_distributed --config full_finetune_distributed
    tune --nnodes 1 --nproc_per_node 2 full_finetune_distributed --config tiny/full_distributed
    # two machines: run on each, with the first machine's address
    tune --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        full_finetune_distributed --config llama2/7B_full

Same config keys, data order and numbers as ``full_finetune_single_device`` with a batch of
``world_size * batch_size``: rank ``r`` takes samples ``r, r + W, ...`` of the epoch's order,
so the union of the ranks' i-th batches is the single-device run's i-th batch (when the
dataset size is not a multiple of ``W``, the sampler repeats up to ``W - 1`` samples at the
end of the epoch to even out the ranks). The model is
built on the meta device, every decoder layer and then the root are sharded with
``fully_shard``, and rank 0 alone reads the checkpoint and broadcasts it one tensor at a time.
With ``dtype=bf16`` the sharded master weights and AdamW state stay fp32 while layers compute
in bf16 and gradients are reduced in fp32; checkpoints are written in bf16, as on one device.

The loss of an optimizer step is the sum of token cross-entropies over every rank's
micro-batches divided by the global count of scored tokens (an all-reduce), so uneven
sequence lengths across ranks still give exactly the single-device gradient. Rank 0 alone
logs and writes checkpoints, gathered into the single-device formats, ``recipe_state.pt``
included: either recipe resumes the other's run (``checkpointer.checkpoint_dir=<output_dir>/
epoch_N checkpointer.recipe_checkpoint=recipe_state.pt resume_from_checkpoint=True``).

A rank that raises logs and re-raises ``rank N: <error>``; torchrun then stops the others.
Collectives give up after 10 minutes (``utils.init_distributed``'s timeout).
"""

import logging
import os
import sys
import time
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from torchtune import config, training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate
from torchtune.modules import TransformerDecoderLayer

log = logging.getLogger(__name__)

# Recipe state stored with intermediate checkpoints, beside "model" and "optimizer".
_RECIPE_STATE_KEYS = ("epochs_run", "total_epochs", "max_steps_per_epoch", "seed", "global_step")
# Only rank 0 reads these (the weights); the other ranks get the rest of the checkpoint.
_RANK0_ONLY_KEYS = ("model", "adapter", "optimizer")


class FullFinetuneRecipeDistributed:
    """Full fine-tuning of a decoder sharded with FSDP2 over all torchrun workers.

    Args:
        cfg: the recipe config; see ``recipes/configs/full_finetune_distributed.yaml``.

    Raises:
        ValueError: on bad values of ``gradient_accumulation_steps``, ``epochs``,
            ``log_every_n_steps``, ``device`` or ``dtype``, or without torchrun's environment.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(cfg.device)
        self._world_size, self._rank = utils.init_distributed(self._device)
        self._is_rank_zero = self._rank == 0
        if self._device.type == "cuda":  # now this rank's GPU, cuda:LOCAL_RANK
            self._device = utils.get_device("cuda")
        self._dtype = utils.get_dtype(cfg.dtype, self._device)
        if self._device.type == "cpu":  # steps re-allocate the same sizes: keep freed pages
            utils.retain_freed_cpu_memory()
        for key in ("gradient_accumulation_steps", "epochs", "log_every_n_steps"):
            if int(cfg[key]) < 1:
                raise ValueError(f"Config key '{key}' must be >= 1, got {cfg[key]}")
        self._grad_accum = int(cfg.gradient_accumulation_steps)
        self._clip_grad_norm = cfg.clip_grad_norm
        self._log_every_n_steps = int(cfg.log_every_n_steps)
        self._resume = bool(cfg.resume_from_checkpoint)
        # One seed on every rank: rank 0's (drawn there when the config gives none).
        self.seed = utils.set_seed(utils.broadcast_object(utils.set_seed(cfg.seed)))
        self.total_epochs = int(cfg.epochs)
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.epochs_run = 0
        self.global_step = 0

    def setup(self, cfg: DictConfig) -> None:
        """Build everything from the config; on resume, restore the recipe state last."""
        self._metric_logger = config.instantiate(cfg.metric_logger) if self._is_rank_zero else None
        ckpt = self._load_checkpoint(cfg.checkpointer)
        if self._resume:
            self._check_recipe_state(ckpt)
        # Popped: the full weights on rank 0 are freed once loaded into the shards.
        self._model = self._setup_model(
            cfg.model,
            cfg.enable_activation_checkpointing,
            ckpt.pop("model", None),
            compile_layers=bool(cfg.get("compile", False)),
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = self._setup_optimizer(cfg.optimizer, ckpt)
        self._loss_fn = config.instantiate(cfg.loss)
        self._sampler, self._dataloader = self._setup_data(cfg.dataset, cfg.shuffle, cfg.batch_size)
        self._steps_per_epoch = self._count_steps_per_epoch()
        self._lr_scheduler = self._setup_lr_scheduler(cfg.lr_scheduler)
        if self._resume:
            # Last: training continues from rank 0's saved RNG state on every rank.
            torch.set_rng_state(ckpt["rng_state"])
            if self._device.type == "cuda" and "cuda_rng_state" in ckpt:
                torch.cuda.set_rng_state(ckpt["cuda_rng_state"], self._device)
        log.info("Memory after setup (rank 0): %s", utils.get_memory_stats(self._device))

    def _load_checkpoint(self, cfg_checkpointer: DictConfig) -> Dict[str, Any]:
        """Rank 0 reads the checkpoint; the others receive everything but the weights and
        the optimizer state (whose keys they get, with None values)."""
        self._checkpointer = config.instantiate(
            cfg_checkpointer, resume_from_checkpoint=self._resume
        )
        ckpt = self._checkpointer.load_checkpoint() if self._is_rank_zero else {}
        small = {k: (None if k in _RANK0_ONLY_KEYS else v) for k, v in ckpt.items()}
        small = utils.broadcast_object(small)
        return ckpt if self._is_rank_zero else small

    def _check_recipe_state(self, ckpt: Dict[str, Any]) -> None:
        missing = [k for k in (*_RECIPE_STATE_KEYS, "optimizer", "rng_state") if k not in ckpt]
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
        # The data order of later epochs derives from the original seed.
        self.seed = utils.set_seed(ckpt["seed"])
        self.epochs_run = int(ckpt["epochs_run"])
        self.global_step = int(ckpt["global_step"])

    def _setup_model(
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: Union[bool, str],
        model_sd: Optional[Dict[str, torch.Tensor]],
        compile_layers: bool = False,
    ) -> nn.Module:
        # No memory yet: parameters are placeholders until to_empty. fp32 masters; with
        # dtype=bf16 FSDP casts them for compute.
        with utils.set_default_dtype(torch.float32), torch.device("meta"):
            model = config.instantiate(cfg_model)
        utils.apply_activation_checkpointing(model, enable_activation_checkpointing)
        if compile_layers:  # `compile: true`; lazy, the first forward compiles
            utils.compile_layers(model)
        param_dtype = self._dtype if self._dtype != torch.float32 else None
        utils.shard_model(
            model, self._device, layer_types=(TransformerDecoderLayer,), param_dtype=param_dtype
        )
        model.to_empty(device=self._device)
        utils.load_from_full_state_dict(model, model_sd)
        n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the full size
        log.info(
            "Model: %.1fM parameters, sharded over %d ranks, computing in %s on %s",
            n_params / 1e6,
            self._world_size,
            self._dtype,
            self._device.type,
        )
        return model

    def _setup_optimizer(
        self, cfg_optimizer: DictConfig, ckpt: Dict[str, Any]
    ) -> torch.optim.Optimizer:
        optimizer = config.instantiate(cfg_optimizer, self._model.parameters())
        if "optimizer" in ckpt:  # on every rank: loading is collective
            utils.load_optimizer_state_dict(self._model, optimizer, ckpt["optimizer"])
        return optimizer

    def _setup_data(
        self, cfg_dataset: DictConfig, shuffle: bool, batch_size: int
    ) -> Tuple[DistributedSampler, DataLoader]:
        ds = config.instantiate(cfg_dataset, tokenizer=self._tokenizer)
        # Every rank draws the same (seed, epoch) permutation and takes every W-th sample of
        # it; a resumed run sees the same later epochs as an uninterrupted one.
        sampler = DistributedSampler(
            ds, num_replicas=self._world_size, rank=self._rank, shuffle=shuffle, seed=self.seed
        )
        collate = partial(padded_collate, padding_idx=self._tokenizer.pad_id)
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate)
        log.info(
            "Dataset: %d samples, %d batches of %d per rank, %d ranks",
            len(ds),
            len(loader),
            batch_size,
            self._world_size,
        )
        return sampler, loader

    def _count_steps_per_epoch(self) -> int:
        steps = len(self._dataloader) // self._grad_accum
        if steps == 0:
            raise ValueError(
                f"The dataset gives {len(self._dataloader)} batches per epoch, fewer than "
                f"gradient_accumulation_steps={self._grad_accum}"
            )
        if self.max_steps_per_epoch is not None:
            steps = min(steps, int(self.max_steps_per_epoch))
        return steps

    def _setup_lr_scheduler(self, cfg_lr_scheduler: Optional[DictConfig]):
        if cfg_lr_scheduler is None:
            return None
        return config.instantiate(
            cfg_lr_scheduler,
            self._optimizer,
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )

    def _loss_sum(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss and scored-token count of one micro-batch."""
        return training.next_token_loss_sum(self._model, self._loss_fn, batch, self._device)

    def _optimizer_step(self, micro_batches: List[Dict[str, torch.Tensor]]) -> Tuple[float, int]:
        """One optimizer step over this rank's micro-batches.

        Returns:
            ``(loss, tokens)``: the step's mean token loss over all ranks, and the number of
            tokens (padding included) all ranks processed.
        """
        # Counted up front, over all ranks, so each backward is already scaled for the step.
        local = sum(
            int((mb["labels"][:, 1:] != CROSS_ENTROPY_IGNORE_IDX).sum()) for mb in micro_batches
        )
        denom = max(int(utils.all_reduce_sum([local], self._device)[0]), 1)
        total = torch.zeros((), device=self._device)
        for mb in micro_batches:
            loss_sum, _ = self._loss_sum(mb)
            # FSDP averages gradients over ranks; times W, that mean is the global sum.
            (loss_sum / denom * self._world_size).backward()
            total += loss_sum.detach()
        if self._clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self._model.parameters(), max_norm=float(self._clip_grad_norm))
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        n_tokens = sum(mb["tokens"].numel() for mb in micro_batches)  # incl. padding
        loss_sum, n_tokens = utils.all_reduce_sum([total.item(), n_tokens], self._device).tolist()
        return loss_sum / denom, int(n_tokens)

    def train(self) -> None:
        """Run the remaining epochs; rank 0 logs every ``log_every_n_steps`` optimizer steps."""
        if self.epochs_run >= self.total_epochs:
            log.info("Nothing to do: %d of %d epochs run", self.epochs_run, self.total_epochs)
        for epoch in range(self.epochs_run, self.total_epochs):
            self._sampler.set_epoch(epoch)
            batches = iter(self._dataloader)
            pbar = tqdm(
                total=self._steps_per_epoch,
                desc=f"epoch {epoch + 1}/{self.total_epochs}",
                disable=not self._is_rank_zero,
            )
            for _ in range(self._steps_per_epoch):
                micro_batches = [next(batches) for _ in range(self._grad_accum)]
                lr = self._optimizer.param_groups[0]["lr"]  # the lr this step uses
                t0 = time.perf_counter()
                loss, n_tokens = self._optimizer_step(micro_batches)  # a device sync point
                elapsed = time.perf_counter() - t0
                self.global_step += 1
                tokens_per_second = n_tokens / max(elapsed, 1e-9)  # all ranks together
                pbar.update(1)
                pbar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}"
                )
                if self._is_rank_zero and self.global_step % self._log_every_n_steps == 0:
                    mem = utils.get_memory_stats(self._device)
                    self._metric_logger.log_dict(
                        {
                            "loss": loss,
                            "lr": lr,
                            "tokens_per_second": tokens_per_second,
                            "peak_memory_gib": mem["peak_memory_gib"],
                        },
                        step=self.global_step,
                    )
            pbar.close()
            self.epochs_run += 1
            self.save_checkpoint(epoch)
        log.info("Peak memory (rank 0): %s", utils.get_memory_stats(self._device))

    def save_checkpoint(self, epoch: int) -> None:
        """Gather the model (and, unless this was the last epoch, the state to resume from)
        on rank 0 and write it there. Every rank must call this."""
        ckpt: Dict[str, Any] = {"model": utils.gather_full_state_dict(self._model, self._dtype)}
        intermediate = self.epochs_run < self.total_epochs
        if intermediate:
            ckpt.update(self._recipe_state())
        if self._is_rank_zero:
            self._checkpointer.save_checkpoint(
                ckpt, epoch=epoch, intermediate_checkpoint=intermediate
            )
        torch.distributed.barrier()  # nobody reads or resumes before the files exist

    def _recipe_state(self) -> Dict[str, Any]:
        state = {
            "optimizer": utils.gather_optimizer_state_dict(self._model, self._optimizer),
            "epochs_run": self.epochs_run,
            "total_epochs": self.total_epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "seed": self.seed,
            "global_step": self.global_step,
            "rng_state": torch.get_rng_state(),
        }
        if self._device.type == "cuda":
            state["cuda_rng_state"] = torch.cuda.get_rng_state(self._device)
        return state

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        torch.distributed.destroy_process_group()


@record
@config.parse
@utils.record_rank_on_failure
def recipe_main(cfg: DictConfig) -> None:
    # Only rank 0 speaks (warnings and errors still come from every rank).
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = FullFinetuneRecipeDistributed(cfg)
    if recipe._is_rank_zero:
        log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
