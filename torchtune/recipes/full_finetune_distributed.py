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
logs and writes checkpoints, gathered into the single-device formats and layout (``epoch_N``,
``step_N`` with ``save_every_n_steps``, ``NAME_state/recipe_state.pt``, ``checkpoints.json``):
either recipe resumes the other's run with the same global batch, mid-epoch.
``resume_from_checkpoint=True`` alone continues from the latest complete checkpoint; an
explicit one is ``checkpointer.checkpoint_dir=<output_dir>/NAME
checkpointer.recipe_checkpoint=<output_dir>/NAME_state/recipe_state.pt``.

A rank that raises logs and re-raises ``rank N: <error>``; torchrun then stops the others.
Collectives give up after 10 minutes (``utils.init_distributed``'s timeout).

With ``validation_dataset`` set, ``training.Validator`` logs ``val_loss`` and
``val_perplexity`` (token-weighted over the whole split, each rank scoring a disjoint share)
with the step's training metrics, every ``eval_every_n_steps`` steps or, by default, after each
epoch's last step; the training RNG and data order stay as they were.
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

log = logging.getLogger(__name__)


class FullFinetuneRecipeDistributed:
    """Full fine-tuning of a decoder sharded with FSDP2 over all torchrun workers.

    Args:
        cfg: the recipe config; see ``recipes/configs/full_finetune_distributed.yaml``.

    Raises:
        ValueError: on bad values of ``gradient_accumulation_steps``, ``epochs``,
            ``log_every_n_steps``, ``device`` or ``dtype``, or without torchrun's environment.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device, self._dtype, self._world_size, self._rank = training.init_distributed_device(
            cfg.device, cfg.dtype
        )
        self._loop = training.LoopSettings.from_config(cfg)
        # One seed on every rank: rank 0's (drawn there when the config gives none).
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
        # Popped: the full weights on rank 0 are freed once loaded into the shards.
        self._model = self._setup_model(
            cfg.model,
            cfg.enable_activation_checkpointing,
            ckpt.pop("model", None),
            compile_layers=bool(cfg.get("compile", False)),
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
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
                    params=self._model.parameters(),
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
        """Gather the model (and, unless this was the last epoch, the state to resume from)
        on rank 0 and write it there. Every rank must call this."""
        ckpt: Dict[str, Any] = {"model": utils.gather_full_state_dict(self._model, self._dtype)}
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
    recipe = FullFinetuneRecipeDistributed(cfg)
    if recipe._is_rank_zero:
        log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
