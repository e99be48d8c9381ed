# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Preference tuning (DPO, IPO or SimPO) of a LoRA adapter, sharded with FSDP2 over torchrun
workers.

    tune --nproc_per_node 2 lora_dpo_distributed --config tiny/lora_dpo

As ``lora_dpo_single_device``, with the model sharded per decoder layer and each rank taking
every ``W``-th pair of the shared order: the step's loss is the mean over all ranks' pairs, so
``W`` ranks with batches of ``b`` log the single-device run with batches of ``W * b``. The
reference is the base model (adapters switched off) for a fresh adapter, or the starting
adapter frozen: a copy of this rank's adapter shards, copied in for the reference forward
and saved (gathered) in ``recipe_state.pt`` for resuming. Step checkpoints
(``save_every_n_steps``), ``max_steps`` and ``resume_from_checkpoint=True`` alone as in
``lora_dpo_single_device``; a run resumes on any number of ranks with the same global batch.
"""

import logging
import os
import sys
import time
from functools import partial
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor import distribute_tensor

from torchtune import config, rlhf, training, utils
from torchtune.data import padded_collate_pairs, padding_id
from torchtune.modules import TransformerDecoderLayer
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_config,
    get_merged_lora_state_dict,
    init_lora_adapters,
    set_trainable_params,
)
from torchtune.recipes.lora_dpo_single_device import REFERENCE_ADAPTER_KEY

log = logging.getLogger(__name__)


class LoRADPORecipeDistributed:
    """LoRA preference tuning of a decoder sharded with FSDP2 over all torchrun workers.

    Args:
        cfg: the recipe config (``tiny/lora_dpo``'s keys).

    Raises:
        ValueError: on bad loop values, without torchrun's environment, a model without LoRA
            adapters, checkpoints that do not fit the model, or resuming without
            ``checkpointer.adapter_checkpoint``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._compile = bool(cfg.get("compile", False))
        self._device, self._dtype, self._world_size, self._rank = training.init_distributed_device(
            cfg.device, cfg.dtype
        )
        self._loop = training.LoopSettings.from_config(cfg)
        # Rank 0's seed on every rank; it also draws fresh adapters, whatever the rank count.
        seed = utils.set_seed(utils.broadcast_object(utils.set_seed(cfg.seed)))
        self._state = training.RecipeState.from_config(cfg, seed=seed)

    @property
    def _is_rank_zero(self) -> bool:
        return self._rank == 0

    def setup(self, cfg: DictConfig) -> None:
        """Build everything from the config; on resume, restore the recipe state last."""
        self._metric_logger = config.instantiate(cfg.metric_logger) if self._is_rank_zero else None
        self._checkpointer = training.build_checkpointer(cfg)
        ckpt = training.load_checkpoint_on_rank_zero(self._checkpointer, self._is_rank_zero)
        if self._loop.resume:
            if "adapter" not in ckpt:  # the key is on every rank, the tensors on rank 0
                raise ValueError(
                    "resume_from_checkpoint=True needs checkpointer.adapter_checkpoint"
                )
            self._state = self._state.resumed_from(ckpt)
            utils.set_seed(self._state.seed)
        self._model = self._setup_model(cfg.model, cfg.enable_activation_checkpointing, ckpt)
        self._reference = partial(
            rlhf.lora_reference_logps,
            self._model,
            device=self._device,
            adapter_params=self._adapter_params,
            reference_adapter=self._reference_adapter,
        )
        self._loss_fn = config.instantiate(cfg.loss)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = config.instantiate(cfg.optimizer, list(self._adapter_params.values()))
        if "optimizer" in ckpt:  # on every rank: loading is collective
            utils.load_optimizer_state_dict(self._model, self._optimizer, ckpt["optimizer"])
        dataset = config.instantiate(cfg.dataset, tokenizer=self._tokenizer)
        self._dataloader = training.build_dataloader(
            dataset,
            batch_size=cfg.batch_size,
            pad_id=padding_id(self._tokenizer),
            shuffle=cfg.shuffle,
            seed=self._state.seed,
            world_size=self._world_size,
            rank=self._rank,
            collate_fn=padded_collate_pairs,
        )
        self._state.signature = training.run_signature(cfg, dataset, self._world_size)
        if self._loop.resume:  # the same global batches as the run resumed, or a ValueError
            training.check_resume_signature(ckpt, self._state.signature)
        # The model folder gets the tokenizer and the chat template of this training data.
        files = training.tokenizer_output_files(cfg, self._tokenizer, self._dataloader.dataset)
        self._checkpointer.set_model_folder_files(files)
        self._steps_per_epoch = training.steps_per_epoch(
            len(self._dataloader),
            self._loop.gradient_accumulation_steps,
            self._state.max_steps_per_epoch,
        )
        self._lr_scheduler = training.build_lr_scheduler(
            cfg.lr_scheduler,
            self._optimizer,
            num_training_steps=self._state.total_steps(self._steps_per_epoch),
            global_step=self._state.global_step,
        )
        # On out of memory, retry the step with half the micro-batch.
        self._oom = training.OomRetry.from_config(cfg, self._device, self._state.global_step)
        if self._loop.resume:
            training.restore_rng_state(ckpt, self._device)  # last: building drew from the RNG

    def _setup_model(
        self, cfg_model: DictConfig, enable_activation_checkpointing: Any, ckpt: Dict[str, Any]
    ) -> nn.Module:
        """The sharded policy, and the reference adapter's shards (None: the base model)."""
        with utils.set_default_dtype(torch.float32), torch.device("meta"):
            model = config.instantiate(cfg_model)
        if not get_adapter_params(model):
            raise ValueError(f"Model '{cfg_model._component_}' has no LoRA adapters to train")
        utils.apply_activation_checkpointing(model, enable_activation_checkpointing)
        if self._compile:  # `compile: true`; lazy, the first forward compiles
            utils.compile_layers(model)
        param_dtype = self._dtype if self._dtype != torch.float32 else None
        utils.shard_model(
            model, self._device, layer_types=(TransformerDecoderLayer,), param_dtype=param_dtype
        )
        model.to_empty(device=self._device)
        has_adapter = "adapter" in ckpt  # on every rank; the tensors on rank 0
        full_sd = None
        if self._is_rank_zero:
            adapter_sd, base_sd = ckpt.pop("adapter", None), ckpt.pop("model")
            if adapter_sd is None:  # the same draw as on one device; DoRA's norms from base_sd
                adapter_sd = init_lora_adapters(model, self._state.seed, base_sd)
            full_sd = {**base_sd, **adapter_sd}
            del base_sd
        utils.load_from_full_state_dict(model, full_sd)  # checks the keys on every rank
        del full_sd
        self._adapter_params = get_adapter_params(model)
        set_trainable_params(model, self._adapter_params)
        self._reference_adapter: Optional[Dict[str, torch.Tensor]] = None
        if self._loop.resume and REFERENCE_ADAPTER_KEY in ckpt:  # broadcast to every rank
            self._reference_adapter = {
                k: distribute_tensor(
                    ckpt[REFERENCE_ADAPTER_KEY][k].to(self._device, p.dtype),
                    p.device_mesh,
                    p.placements,
                )
                for k, p in self._adapter_params.items()
            }
        elif has_adapter and not self._loop.resume:
            self._reference_adapter = {
                k: p.detach().clone() for k, p in self._adapter_params.items()
            }
        log.info(
            "Model sharded over %d ranks, computing in %s on %s; reference: %s",
            self._world_size,
            self._dtype,
            self._device.type,
            "base model" if self._reference_adapter is None else "the starting adapter, frozen",
        )
        return model

    def train(self) -> None:
        """Run the remaining epochs; rank 0 logs every ``log_every_n_steps`` optimizer steps."""
        state, steps_per_epoch = self._state, self._steps_per_epoch
        self._model.train()
        if state.finished:
            log.info("Nothing to do: %d of %d epochs run", state.epochs_run, state.total_epochs)
        progress = training.StepLog(
            self._metric_logger,
            self._loop.log_every_n_steps,
            self._device,
            state.total_steps(steps_per_epoch),
            desc="train",
            show=self._is_rank_zero,
            initial=state.global_step,
        )
        for epoch in state.remaining_epochs():  # stops at max_steps
            progress.set_description(f"epoch {epoch + 1}/{state.total_epochs}")
            for micro_batches in training.epoch_micro_batches(
                self._dataloader,
                epoch,
                state.epoch_steps(steps_per_epoch),
                self._loop.gradient_accumulation_steps,
                start_step=state.steps_in_epoch,
            ):
                lr = self._optimizer.param_groups[0]["lr"]
                t0 = time.perf_counter()
                metrics = rlhf.preference_step(  # all ranks' means
                    self._model,
                    self._loss_fn,
                    self._optimizer,
                    micro_batches,
                    params=self._adapter_params.values(),
                    device=self._device,
                    reference=self._reference if self._loss_fn.needs_reference else None,
                    world_size=self._world_size,
                    clip_grad_norm=self._loop.clip_grad_norm,
                    lr_scheduler=self._lr_scheduler,
                    oom=self._oom,
                )
                state.end_step()
                loss, tokens = metrics.pop("loss"), metrics.pop("tokens")
                seconds = time.perf_counter() - t0
                progress.step(state.global_step, loss, lr, tokens, seconds, extra=metrics)
                if state.step_checkpoint_due(self._loop.save_every_n_steps, steps_per_epoch):
                    self.save_checkpoint()
            state.close_epoch(steps_per_epoch)
            self.save_checkpoint()  # epoch_N, or step_N where max_steps ends the run
        progress.close()

    def save_checkpoint(self) -> None:
        """Gather on rank 0 and write the merged model and the adapter (plus, unless this was
        the run's end, the state to resume from). Every rank must call this."""
        full_sd = utils.gather_full_state_dict(self._model)  # fp32 masters; {} off rank 0
        ckpt: Dict[str, Any] = {}
        if self._is_rank_zero:
            merged = get_merged_lora_state_dict(self._model, full_sd)
            adapter = get_adapter_state_dict(self._model, full_sd)
            ckpt["model"] = {k: v.to(self._dtype) for k, v in merged.items()}
            ckpt["adapter"] = {k: v.to(self._dtype) for k, v in adapter.items()}
            ckpt["adapter_config"] = get_lora_config(self._model)
        del full_sd
        last = self._state.finished
        if not last:
            ckpt["optimizer"] = utils.gather_optimizer_state_dict(self._model, self._optimizer)
            ckpt.update(self._state.state_dict(self._device))
            if self._reference_adapter is not None:  # collective: every rank gathers
                ckpt[REFERENCE_ADAPTER_KEY] = {
                    k: v.full_tensor().cpu() for k, v in self._reference_adapter.items()
                }
        if self._is_rank_zero:
            self._checkpointer.save_checkpoint(
                ckpt,
                intermediate_checkpoint=not last,
                name=self._state.checkpoint_name,
                info=self._state.checkpoint_info(),
            )
        torch.distributed.barrier()  # nobody reads or resumes before the files exist

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
    recipe = LoRADPORecipeDistributed(cfg)
    if recipe._is_rank_zero:
        log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
