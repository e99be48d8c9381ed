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
and only they are in the optimizer. Rank 0 writes the checkpoints of the single-device
recipe in its layout (``epoch_N``, ``step_N`` with ``save_every_n_steps``, each with
``NAME_adapter/``, ``NAME_peft/``, ``NAME_state/``, listed in ``checkpoints.json``).
``resume_from_checkpoint=True`` alone continues from the latest complete one, mid-epoch, on any
number of ranks with the same global batch (``world_size * batch_size``); ``recipe_state.pt``
has the single-device layout, so either recipe resumes the other's run. An explicit one is
``checkpointer.adapter_checkpoint=<output_dir>/NAME_adapter/adapter.safetensors
checkpointer.recipe_checkpoint=<output_dir>/NAME_state/recipe_state.pt``.

Fresh adapters (no ``checkpointer.adapter_checkpoint``) are drawn on rank 0 from ``seed``
alone (``peft.init_lora_adapters``: ``lora_a`` kaiming-uniform, ``lora_b`` zero), as the
single-device recipe draws them: a fresh run on N ranks logs the single-device run's losses.

With ``validation_dataset`` set, ``training.Validator`` logs ``val_loss`` and
``val_perplexity`` (token-weighted over the whole split, each rank scoring a disjoint share)
with the step's training metrics, every ``eval_every_n_steps`` steps or, by default, after each
epoch's last step; the model runs in eval mode there, so without ``lora_dropout``, and the
training RNG and data order stay as they were.
"""

import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from torchtune import config, training, utils
from torchtune.data import padding_id
from torchtune.modules import TransformerDecoderLayer
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_config,
    get_merged_lora_state_dict,
    init_lora_adapters,
    set_trainable_params,
)

log = logging.getLogger(__name__)


class LoRAFinetuneRecipeDistributed:
    """LoRA fine-tuning of a decoder sharded with FSDP2 over all torchrun workers.

    Args:
        cfg: the recipe config; see ``recipes/configs/lora_finetune_distributed.yaml``.

    Raises:
        ValueError: on bad values of ``gradient_accumulation_steps``, ``epochs``,
            ``log_every_n_steps``, ``device`` or ``dtype``, or without torchrun's environment.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device, self._dtype, self._world_size, self._rank = training.init_distributed_device(
            cfg.device, cfg.dtype, retain_freed_memory=not cfg.model.get("quantize_base", False)
        )
        self._loop = training.LoopSettings.from_config(cfg)
        # One seed on every rank: rank 0's (drawn there when the config gives none). It also
        # draws fresh adapters, so they do not depend on the number of ranks.
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
            self._state = self._state.resumed_from(ckpt)
            utils.set_seed(self._state.seed)  # later epochs' data order derives from it
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
        self._optimizer = config.instantiate(cfg.optimizer, list(self._adapter_params.values()))
        if "optimizer" in ckpt:  # on every rank: loading is collective
            utils.load_optimizer_state_dict(self._model, self._optimizer, ckpt["optimizer"])
        self._loss_fn = config.instantiate(cfg.loss)
        dataset = config.instantiate(cfg.dataset, tokenizer=self._tokenizer)
        self._dataloader = training.build_dataloader(
            dataset,
            batch_size=cfg.batch_size,
            pad_id=padding_id(self._tokenizer),
            shuffle=cfg.shuffle,
            seed=self._state.seed,
            world_size=self._world_size,
            rank=self._rank,
        )
        self._state.signature = training.run_signature(cfg, dataset, self._world_size)
        if self._loop.resume:  # the same batches as the run resumed, or a ValueError
            training.check_resume_signature(ckpt, self._state.signature)
        # The model folder gets the tokenizer and the chat template of this training data.
        files = training.tokenizer_output_files(cfg, self._tokenizer, self._dataloader.dataset)
        self._checkpointer.set_model_folder_files(files)
        self._steps_per_epoch = training.steps_per_epoch(
            len(self._dataloader),
            self._loop.gradient_accumulation_steps,
            self._state.max_steps_per_epoch,
        )
        self._validator = training.Validator.from_config(  # validation_dataset, if any
            cfg,
            self._tokenizer,
            steps_per_epoch=self._steps_per_epoch,
            device=self._device,
            world_size=self._world_size,
            rank=self._rank,
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
            # Last: training continues from rank 0's saved RNG state on every rank.
            training.restore_rng_state(ckpt, self._device)
        log.info("Memory after setup (rank 0): %s", utils.get_memory_stats(self._device))

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
            if adapter_sd is None:  # the same draw as on one device; DoRA's norms from base_sd
                adapter_sd = init_lora_adapters(model, self._state.seed, base_sd)
            full_sd = {**base_sd, **adapter_sd}
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

    def train(self) -> None:
        """Run the remaining epochs; rank 0 logs every ``log_every_n_steps`` optimizer steps."""
        state, steps_per_epoch = self._state, self._steps_per_epoch
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
                lr = self._optimizer.param_groups[0]["lr"]  # the lr this step uses
                t0 = time.perf_counter()
                loss, n_tokens = training.optimizer_step(  # all ranks' loss and tokens
                    self._model,
                    self._loss_fn,
                    self._optimizer,
                    micro_batches,
                    params=self._adapter_params.values(),
                    device=self._device,
                    world_size=self._world_size,
                    clip_grad_norm=self._loop.clip_grad_norm,
                    lr_scheduler=self._lr_scheduler,
                    oom=self._oom,
                )
                seconds = time.perf_counter() - t0
                state.end_step()
                val = self._validator.maybe_run(self._model, self._loss_fn, state)  # or None
                progress.step(state.global_step, loss, lr, n_tokens, seconds, extra=val)
                if state.step_checkpoint_due(self._loop.save_every_n_steps, steps_per_epoch):
                    self.save_checkpoint()
            state.close_epoch(steps_per_epoch)
            self.save_checkpoint()  # epoch_N, or step_N where max_steps ends the run
        progress.close()
        log.info("Peak memory (rank 0): %s", utils.get_memory_stats(self._device))

    def save_checkpoint(self) -> None:
        """Gather the model on rank 0 and write the merged model and the adapter there (plus,
        unless this was the last epoch, the state to resume from). Every rank must call this."""
        state_dict = utils.gather_full_state_dict(self._model)  # fp32 masters; {} off rank 0
        ckpt: Dict[str, Any] = {}
        if self._is_rank_zero:
            # Merged in fp32 from the masters, then cast to the checkpoint's dtype.
            merged = get_merged_lora_state_dict(self._model, state_dict)
            adapter = get_adapter_state_dict(self._model, state_dict)
            ckpt = {
                "model": {k: v.to(self._dtype) for k, v in merged.items()},
                "adapter": {k: v.to(self._dtype) for k, v in adapter.items()},
                "adapter_config": get_lora_config(self._model),
            }
        del state_dict
        intermediate = not self._state.finished
        if intermediate:
            ckpt["optimizer"] = utils.gather_optimizer_state_dict(self._model, self._optimizer)
            ckpt.update(self._state.state_dict(self._device))
        if self._is_rank_zero:
            self._checkpointer.save_checkpoint(
                ckpt,
                intermediate_checkpoint=intermediate,
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
    recipe = LoRAFinetuneRecipeDistributed(cfg)
    if recipe._is_rank_zero:
        log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
