# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Preference tuning (DPO, IPO or SimPO) of a LoRA adapter on one device.

    tune lora_dpo_single_device --config tiny/lora_dpo
    tune lora_dpo_single_device --config tiny/lora_dpo loss._component_=torchtune.rlhf.SimPOLoss

The base model is frozen; only the LoRA matrices train. Each step scores the chosen and the
rejected responses of its pairs in one forward (``torchtune.rlhf.sequence_logps``); the loss is
the config's ``loss`` (``torchtune.rlhf.DPOLoss``, ``IPOLoss`` or ``SimPOLoss``), averaged over
the step's pairs, so ``gradient_accumulation_steps=k`` is a k-times larger batch.

The reference policy costs no second model. With a fresh adapter (no
``checkpointer.adapter_checkpoint``) it is the base model: the same modules with their adapters
switched off. Starting from an adapter (ours, or a PEFT folder), it is that adapter frozen as
at the start: a copy of the adapter weights only, swapped in for the reference forward (and
saved in ``recipe_state.pt``, so a resumed run keeps the same reference). SimPO has no
reference, and none is computed.

Every step logs TRL's metric names: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, plus ``lr``,
``tokens_per_second`` and ``peak_memory_gib``. Outputs, step checkpoints
(``save_every_n_steps``, ``keep_last_n_checkpoints``), ``max_steps`` and resuming
(``resume_from_checkpoint=True`` alone continues from the latest complete checkpoint, mid-epoch
with the same batches) as in ``lora_finetune_single_device``.
"""

import logging
import sys
import time
from functools import partial
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from torchtune import config, rlhf, training, utils
from torchtune.data import padded_collate_pairs, padding_id
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_config,
    get_merged_lora_state_dict,
    init_lora_adapters,
    set_trainable_params,
)

log = logging.getLogger(__name__)

# recipe_state.pt's key for the frozen reference adapter (absent: the base model is it).
REFERENCE_ADAPTER_KEY = "reference_adapter"


class LoRADPORecipeSingleDevice:
    """LoRA preference tuning of a decoder on one device (CPU, one GPU or MPS).

    Args:
        cfg: the recipe config (``tiny/lora_dpo``'s keys: those of ``tiny/lora`` with a
            ``torchtune.datasets.preference_dataset`` and a ``torchtune.rlhf`` loss).

    Raises:
        ValueError: on bad loop values, a model without LoRA adapters, checkpoints that do
            not fit the model, or resuming without ``checkpointer.adapter_checkpoint``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._compile = bool(cfg.get("compile", False))
        self._device, self._dtype = training.init_device(cfg.device, cfg.dtype)
        self._loop = training.LoopSettings.from_config(cfg)
        self._state = training.RecipeState.from_config(cfg, seed=utils.set_seed(cfg.seed))

    def setup(self, cfg: DictConfig) -> None:
        """Build everything from the config; on resume, restore the recipe state last."""
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._checkpointer = training.build_checkpointer(cfg)
        ckpt = self._checkpointer.load_checkpoint()
        if self._loop.resume:
            self._state = self._state.resumed_from(ckpt)
            utils.set_seed(self._state.seed)  # later epochs' data order derives from it
            if "adapter" not in ckpt:
                raise ValueError(
                    "resume_from_checkpoint=True needs checkpointer.adapter_checkpoint"
                )
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
        if "optimizer" in ckpt:
            self._optimizer.load_state_dict(ckpt["optimizer"])
        dataset = config.instantiate(cfg.dataset, tokenizer=self._tokenizer)
        self._dataloader = training.build_dataloader(
            dataset,
            batch_size=cfg.batch_size,
            pad_id=padding_id(self._tokenizer),
            shuffle=cfg.shuffle,
            seed=self._state.seed,
            collate_fn=padded_collate_pairs,
        )
        self._state.signature = training.run_signature(cfg, dataset)
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
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: Any,
        ckpt: Dict[str, Any],
    ) -> nn.Module:
        """The policy (base + adapter, only the adapter trainable) and its reference: None for
        the base model (adapters switched off), else a frozen copy of the starting adapter."""
        with utils.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)
        self._adapter_params = get_adapter_params(model)
        if not self._adapter_params:
            raise ValueError(f"Model '{cfg_model._component_}' has no LoRA adapters to train")
        adapter_sd = ckpt.get("adapter")
        if adapter_sd is None:  # DoRA's magnitudes are the norms of the base weights
            adapter_sd = init_lora_adapters(model, self._state.seed, ckpt["model"])
        missing, unexpected = model.load_state_dict({**ckpt["model"], **adapter_sd}, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"Checkpoints do not fit the model: missing {sorted(missing)}, unexpected "
                f"{sorted(unexpected)}"
            )
        set_trainable_params(model, self._adapter_params)
        utils.apply_activation_checkpointing(model, enable_activation_checkpointing)
        if self._compile:  # `compile: true`; lazy, the first forward compiles
            utils.compile_layers(model)
        if self._loop.resume:
            reference = ckpt.get(REFERENCE_ADAPTER_KEY)
        else:
            reference = ckpt.get("adapter")  # None: a fresh adapter, the base is the reference
        self._reference_adapter: Optional[Dict[str, torch.Tensor]] = None
        if reference is not None:
            self._reference_adapter = {
                k: reference[k].to(device=self._device, dtype=p.dtype, copy=True)
                for k, p in self._adapter_params.items()
            }
        log.info(
            "Model: %.1fM parameters (%.2fM trainable) in %s on %s; reference: %s",
            sum(p.numel() for p in model.parameters()) / 1e6,
            sum(p.numel() for p in self._adapter_params.values()) / 1e6,
            self._dtype,
            self._device,
            "base model" if reference is None else "the starting adapter, frozen",
        )
        return model

    def train(self) -> None:
        """Run the remaining epochs, logging every ``log_every_n_steps`` optimizer steps."""
        state, steps_per_epoch = self._state, self._steps_per_epoch
        if state.finished:
            log.info("Nothing to do: %d of %d epochs run", state.epochs_run, state.total_epochs)
        self._model.train()
        progress = training.StepLog(
            self._metric_logger,
            self._loop.log_every_n_steps,
            self._device,
            state.total_steps(steps_per_epoch),
            desc="train",
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
                metrics = rlhf.preference_step(
                    self._model,
                    self._loss_fn,
                    self._optimizer,
                    micro_batches,
                    params=self._adapter_params.values(),
                    device=self._device,
                    reference=self._reference if self._loss_fn.needs_reference else None,
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
        log.info("Peak memory: %s", utils.get_memory_stats(self._device))

    def save_checkpoint(self) -> None:
        """The merged model and the adapter; unless this ends the run, also the state to
        resume from, with the frozen reference adapter when there is one."""
        sd = {k: v.detach().cpu() for k, v in self._model.state_dict().items()}
        ckpt: Dict[str, Any] = {
            "model": get_merged_lora_state_dict(self._model, sd),
            "adapter": get_adapter_state_dict(self._model, sd),
            "adapter_config": get_lora_config(self._model),
        }
        intermediate = not self._state.finished
        if intermediate:
            ckpt.update(self._state.state_dict(self._device))
            ckpt["optimizer"] = self._optimizer.state_dict()
            if self._reference_adapter is not None:
                ckpt[REFERENCE_ADAPTER_KEY] = {
                    k: v.cpu() for k, v in self._reference_adapter.items()
                }
        self._checkpointer.save_checkpoint(
            ckpt,
            intermediate_checkpoint=intermediate,
            name=self._state.checkpoint_name,
            info=self._state.checkpoint_info(),
        )

    def cleanup(self) -> None:
        self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    # Does nothing when the caller already configured logging.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
