# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Full fine-tuning on one device.

    tune full_finetune_single_device --config full_finetune_single_device
    tune full_finetune_single_device --config tiny/full epochs=1

Every parameter is trained. The loss of an optimizer step is the sum of token cross-entropies
over all its micro-batches divided by the number of scored tokens in the whole step, so
``gradient_accumulation_steps=k`` gives exactly the gradient of a k-times larger batch
(batches left over at the end of an epoch that do not fill a step are skipped).

Checkpoints (layout in ``torchtune/utils/_checkpointing/_index.py``): at the end of every
epoch ``output_dir/epoch_N/`` (N epochs run) receives the model in the format it came in, and
with ``save_every_n_steps: K`` every K global steps ``output_dir/step_N/`` does (the newest
``keep_last_n_checkpoints`` of them are kept). Each but the run's last also has
``NAME_state/recipe_state.pt`` (optimizer, position in the epoch's data order, seed, RNG);
``checkpoints.json`` lists the complete ones. ``resume_from_checkpoint=True`` alone continues
from the latest, mid-epoch with the same batches, learning rates and random draws (the
checkpointer reads the model from its folder); an explicit one is
``checkpointer.checkpoint_dir=<output_dir>/NAME
checkpointer.recipe_checkpoint=<output_dir>/NAME_state/recipe_state.pt``. ``max_steps`` caps
the optimizer steps over all epochs.

With ``validation_dataset`` set, ``training.Validator`` logs ``val_loss`` and
``val_perplexity`` (token-weighted over the whole split) with the step's training metrics,
every ``eval_every_n_steps`` steps or, by default, after each epoch's last step; the training
RNG and data order stay as they were.
"""

import logging
import sys
import time
from typing import Any, Dict, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from torchtune import config, training, utils
from torchtune.data import padding_id

log = logging.getLogger(__name__)


class FullFinetuneRecipeSingleDevice:
    """Full fine-tuning of a decoder on one device (CPU, one GPU or MPS).

    Args:
        cfg: the recipe config; see ``recipes/configs/full_finetune_single_device.yaml``.

    Raises:
        ValueError: on bad values of ``gradient_accumulation_steps``, ``epochs``,
            ``log_every_n_steps``, ``device`` or ``dtype``.
    """

    def __init__(self, cfg: DictConfig) -> None:
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
            # The data order of later epochs derives from the original seed.
            utils.set_seed(self._state.seed)
        self._model = self._setup_model(
            cfg.model,
            cfg.enable_activation_checkpointing,
            ckpt["model"],
            compile_layers=bool(cfg.get("compile", False)),
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
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
        model_sd: Dict[str, torch.Tensor],
        compile_layers: bool = False,
    ) -> nn.Module:
        with utils.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)
        model.load_state_dict(model_sd, strict=True)
        utils.apply_activation_checkpointing(model, enable_activation_checkpointing)
        if compile_layers:  # `compile: true`; lazy, the first forward compiles
            utils.compile_layers(model)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("Model: %.1fM parameters in %s on %s", n_params / 1e6, self._dtype, self._device)
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
                    params=self._model.parameters(),
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
        """Save the model (and, unless this was the last epoch, the state to resume from)."""
        ckpt: Dict[str, Any] = {
            "model": {k: v.detach().cpu() for k, v in self._model.state_dict().items()}
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
    recipe = FullFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
