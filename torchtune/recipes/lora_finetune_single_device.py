# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""LoRA fine-tuning on one device.

    tune lora_finetune_single_device --config lora_finetune_single_device
    tune lora_finetune_single_device --config tiny/lora epochs=1

The base model is frozen; only the LoRA matrices train, and only they are in the optimizer.
The loss of an optimizer step is the sum of token cross-entropies over all its micro-batches
divided by the number of scored tokens in the whole step, so ``gradient_accumulation_steps=k``
gives exactly the gradient of a k-times larger batch (batches left over at the end of an
epoch that do not fill a step are skipped).

Checkpoints (layout in ``torchtune/utils/_checkpointing/_index.py``): at the end of every
epoch, and with ``save_every_n_steps: K`` every K global steps, checkpoint ``epoch_N`` (N
epochs run) or ``step_N`` (N global steps) is written: ``output_dir/NAME/`` the merged model in
the format the base came in, ``NAME_adapter/adapter.safetensors`` (our keys),
``NAME_peft/`` PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``, and, except for
the run's last, ``NAME_state/recipe_state.pt``; ``checkpoints.json`` lists the complete ones
and ``keep_last_n_checkpoints`` prunes old step checkpoints. ``resume_from_checkpoint=True``
alone continues from the latest (same base, saved adapter), mid-epoch with the same batches,
learning rates and random draws; an explicit one is
``checkpointer.adapter_checkpoint=<output_dir>/NAME_adapter/adapter.safetensors
checkpointer.recipe_checkpoint=<output_dir>/NAME_state/recipe_state.pt``. ``max_steps`` caps
the optimizer steps over all epochs.

With ``validation_dataset`` set, ``training.Validator`` logs ``val_loss`` and
``val_perplexity`` (token-weighted over the whole split) with the step's training metrics,
every ``eval_every_n_steps`` steps or, by default, after each epoch's last step; the model runs
in eval mode there, so without ``lora_dropout``, and the training RNG and data order stay as
they were.
"""

import logging
import sys
import time
from typing import Any, Dict, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from torchtune import config, training, utils
from torchtune.data import padding_id
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_config,
    get_merged_lora_state_dict,
    init_lora_adapters,
    set_trainable_params,
)

log = logging.getLogger(__name__)


class LoRAFinetuneRecipeSingleDevice:
    """LoRA fine-tuning of a decoder on one device (CPU, one GPU or MPS).

    ``checkpointer.adapter_checkpoint``, when set, gives the adapter to start from (always
    the case on resume); otherwise the adapters start from ``seed`` as on N ranks
    (``peft.init_lora_adapters``: ``lora_a`` kaiming-uniform, ``lora_b`` zero).

    Args:
        cfg: the recipe config; see ``recipes/configs/lora_finetune_single_device.yaml``.

    Raises:
        ValueError: on bad values of ``gradient_accumulation_steps``, ``epochs``,
            ``log_every_n_steps``, ``device`` or ``dtype``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device, self._dtype = training.init_device(
            cfg.device, cfg.dtype, retain_freed_memory=not cfg.model.get("quantize_base", False)
        )
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
        self._model = self._setup_model(
            cfg.model,
            cfg.enable_activation_checkpointing,
            ckpt["model"],
            ckpt.get("adapter"),
            compile_layers=bool(cfg.get("compile", False)),
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = config.instantiate(cfg.optimizer, list(self._adapter_params.values()))
        if "optimizer" in ckpt:
            self._optimizer.load_state_dict(ckpt["optimizer"])
        self._loss_fn = config.instantiate(cfg.loss)
        dataset = config.instantiate(cfg.dataset, tokenizer=self._tokenizer)
        self._dataloader = training.build_dataloader(
            dataset,
            batch_size=cfg.batch_size,
            pad_id=padding_id(self._tokenizer),
            shuffle=cfg.shuffle,
            seed=self._state.seed,
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
        self._validator = training.Validator.from_config(  # validation_dataset, if any
            cfg,
            self._tokenizer,
            steps_per_epoch=self._steps_per_epoch,
            device=self._device,
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
            # Last: building the model above drew from the RNG; training continues from here.
            training.restore_rng_state(ckpt, self._device)
        log.info("Memory after setup: %s", utils.get_memory_stats(self._device))

    def _setup_model(
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: Union[bool, str],
        base_sd: Dict[str, torch.Tensor],
        adapter_sd: Optional[Dict[str, torch.Tensor]],
        compile_layers: bool = False,
    ) -> nn.Module:
        with utils.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)
        self._adapter_params = get_adapter_params(model)
        if not self._adapter_params:
            raise ValueError(f"Model '{cfg_model._component_}' has no LoRA adapters to train")
        missing, unexpected = model.load_state_dict(base_sd, strict=False)
        wrong_missing = sorted(set(missing) - set(self._adapter_params))
        if wrong_missing or unexpected:
            raise ValueError(
                f"Base checkpoint does not fit the model: missing {wrong_missing}, "
                f"unexpected {sorted(unexpected)}"
            )
        if adapter_sd is None:  # the same draw as on N ranks
            adapter_sd = init_lora_adapters(model, self._state.seed)
        if set(adapter_sd) != set(self._adapter_params):
            raise ValueError(
                "Adapter checkpoint does not fit the model: missing "
                f"{sorted(set(self._adapter_params) - set(adapter_sd))}, unexpected "
                f"{sorted(set(adapter_sd) - set(self._adapter_params))}"
            )
        model.load_state_dict(adapter_sd, strict=False)
        set_trainable_params(model, self._adapter_params)
        utils.apply_activation_checkpointing(model, enable_activation_checkpointing)
        if compile_layers:  # `compile: true`; lazy, the first forward compiles
            utils.compile_layers(model)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in self._adapter_params.values())
        log.info(
            "Model: %.1fM parameters (%.2fM trainable) in %s on %s",
            n_params / 1e6,
            n_train / 1e6,
            self._dtype,
            self._device,
        )
        return model

    def train(self) -> None:
        """Run the remaining epochs, logging every ``log_every_n_steps`` optimizer steps."""
        state, steps_per_epoch = self._state, self._steps_per_epoch
        if state.finished:
            log.info("Nothing to do: %d of %d epochs run", state.epochs_run, state.total_epochs)
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
                loss, n_tokens = training.optimizer_step(
                    self._model,
                    self._loss_fn,
                    self._optimizer,
                    micro_batches,
                    params=self._adapter_params.values(),
                    device=self._device,
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
        log.info("Peak memory: %s", utils.get_memory_stats(self._device))

    def save_checkpoint(self) -> None:
        """Save the merged model and the adapter (plus, unless this was the last epoch, the
        state to resume from)."""
        state_dict = {k: v.detach().cpu() for k, v in self._model.state_dict().items()}
        ckpt: Dict[str, Any] = {
            "model": get_merged_lora_state_dict(self._model, state_dict),
            "adapter": get_adapter_state_dict(self._model, state_dict),
            "adapter_config": get_lora_config(self._model),
        }
        intermediate = not self._state.finished
        if intermediate:
            ckpt["optimizer"] = self._optimizer.state_dict()
            ckpt.update(self._state.state_dict(self._device))
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
    recipe = LoRAFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
