# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""LoRA fine-tuning on several devices with FSDP2, launched through torchrun.

    tune --nnodes 1 --nproc_per_node 2 lora_finetune_distributed --config lora_finetune_distributed
    tune --nnodes 1 --nproc_per_node 2 lora_finetune_distributed --config tiny/lora_distributed
    # two machines: run on each, with the first machine's address
    tune --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        lora_finetune_distributed --config llama2/7B_lora

Same config keys, data order and numbers as ``lora_finetune_single_device`` with a batch of
``world_size * batch_size`` (see ``full_finetune_distributed`` for the sharding, the loss
normalisation and the data split). The base model is frozen; only the LoRA matrices train
and only they are in the optimizer. At the end of every epoch rank 0 writes, as on one
device, the merged model in the format the base came in and the adapter alone in
torchtune's format and in PEFT's. To resume, keep the base checkpoint and add
``checkpointer.adapter_checkpoint=<output_dir>/epoch_N/adapter.safetensors
checkpointer.recipe_checkpoint=<output_dir>/epoch_N/recipe_state.pt resume_from_checkpoint=True``;
``recipe_state.pt`` has the single-device layout, so either recipe resumes the other's run.

Fresh adapters (no ``checkpointer.adapter_checkpoint``) are drawn on rank 0 from ``seed``
alone: ``lora_a`` kaiming-uniform, ``lora_b`` zero. The single-device recipe draws them
after the base model's own (discarded) initialisation, so the two start from different
``lora_a`` (the first step's loss is the same: ``lora_b`` is zero); start both from the same
``adapter_checkpoint`` for identical runs.
"""

import logging
import math
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
from torchtune.modules.peft import get_adapter_params, get_merged_lora_ckpt, set_trainable_params

log = logging.getLogger(__name__)

# Recipe state stored with intermediate checkpoints, beside "model" and "optimizer".
_RECIPE_STATE_KEYS = ("epochs_run", "total_epochs", "max_steps_per_epoch", "seed", "global_step")
# Only rank 0 reads these (the weights); the other ranks get the rest of the checkpoint.
_RANK0_ONLY_KEYS = ("model", "adapter", "optimizer")


class LoRAFinetuneRecipeDistributed:
    """LoRA fine-tuning of a decoder sharded with FSDP2 over all torchrun workers.

    Args:
        cfg: the recipe config; see ``recipes/configs/lora_finetune_distributed.yaml``.

    Raises:
        ValueError: on bad values of ``gradient_accumulation_steps``, ``epochs``,
            ``log_every_n_steps``, ``device``, ``dtype``, a model config without
            ``lora_rank``/``lora_alpha``, or without torchrun's environment.
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
        for key in ("lora_rank", "lora_alpha"):
            if cfg.model.get(key) is None:
                raise ValueError(f"Config key 'model.{key}' must be set for LoRA fine-tuning")
        self._lora_rank = int(cfg.model.lora_rank)
        self._lora_alpha = float(cfg.model.lora_alpha)
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
            if "adapter" not in ckpt:  # the key is on every rank, the tensors on rank 0
                raise ValueError(
                    "resume_from_checkpoint=True needs checkpointer.adapter_checkpoint"
                )
        # Popped: the full weights on rank 0 are freed once loaded into the shards.
        self._model = self._setup_model(
            cfg.model,
            cfg.enable_activation_checkpointing,
            ckpt.pop("model", None),
            ckpt.pop("adapter", None),
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
        base_sd: Optional[Dict[str, torch.Tensor]],
        adapter_sd: Optional[Dict[str, torch.Tensor]],
        compile_layers: bool = False,
    ) -> nn.Module:
        # No memory yet: parameters are placeholders until to_empty. fp32 masters; with
        # dtype=bf16 FSDP casts them for compute.
        with utils.set_default_dtype(torch.float32), torch.device("meta"):
            model = config.instantiate(cfg_model)
        if not get_adapter_params(model):
            raise ValueError(f"Model '{cfg_model._component_}' has no LoRA adapters to train")
        utils.apply_activation_checkpointing(model, enable_activation_checkpointing)
        if compile_layers:  # `compile: true`; lazy, the first forward compiles
            utils.compile_layers(model)
        param_dtype = self._dtype if self._dtype != torch.float32 else None
        utils.shard_model(
            model, self._device, layer_types=(TransformerDecoderLayer,), param_dtype=param_dtype
        )
        model.to_empty(device=self._device)
        full_sd = None
        if self._is_rank_zero:
            adapters = adapter_sd if adapter_sd is not None else self._fresh_adapters(model)
            full_sd = {**base_sd, **adapters}
        # Checks (on every rank) that base + adapter keys are exactly the model's.
        utils.load_from_full_state_dict(model, full_sd)
        del full_sd, base_sd
        self._adapter_params = get_adapter_params(model)
        set_trainable_params(model, self._adapter_params)
        n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the full size
        n_train = sum(p.numel() for p in self._adapter_params.values())
        log.info(
            "Model: %.1fM parameters (%.2fM trainable), sharded over %d ranks, computing in "
            "%s on %s",
            n_params / 1e6,
            n_train / 1e6,
            self._world_size,
            self._dtype,
            self._device.type,
        )
        return model

    def _fresh_adapters(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """Full CPU adapter tensors drawn from ``seed``: ``lora_a`` kaiming-uniform (as
        ``nn.Linear``), ``lora_b`` zero, so the model starts as the base model."""
        gen = torch.Generator().manual_seed(self.seed)
        adapters = {}
        for name, param in get_adapter_params(model).items():
            t = torch.zeros(param.shape, dtype=torch.float32)
            if name.endswith("lora_a.weight"):
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
            adapters[name] = t
        return adapters

    def _setup_optimizer(
        self, cfg_optimizer: DictConfig, ckpt: Dict[str, Any]
    ) -> torch.optim.Optimizer:
        optimizer = config.instantiate(cfg_optimizer, list(self._adapter_params.values()))
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
            nn.utils.clip_grad_norm_(
                self._adapter_params.values(), max_norm=float(self._clip_grad_norm)
            )
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
        """Gather the model on rank 0 and write the merged model and the adapter there (plus,
        unless this was the last epoch, the state to resume from). Every rank must call this."""
        state_dict = utils.gather_full_state_dict(self._model)  # fp32 masters; {} off rank 0
        ckpt: Dict[str, Any] = {}
        if self._is_rank_zero:
            adapter = {k: state_dict[k].to(self._dtype) for k in self._adapter_params}
            merged = get_merged_lora_ckpt(state_dict, self._lora_rank, self._lora_alpha)
            ckpt = {
                "model": {k: v.to(self._dtype) for k, v in merged.items()},
                "adapter": adapter,
                "adapter_config": {
                    "r": self._lora_rank,
                    "lora_alpha": self._lora_alpha,
                    # "layers.0.attn.q_proj.lora_a.weight" -> "q_proj"
                    "target_modules": sorted({k.split(".")[-3] for k in adapter}),
                },
            }
        del state_dict
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
    recipe = LoRAFinetuneRecipeDistributed(cfg)
    if recipe._is_rank_zero:
        log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
