# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Full-weight preference tuning (DPO, IPO or SimPO), sharded with FSDP2 over torchrun workers.

    tune --nproc_per_node 2 full_dpo_distributed --config tiny/full_dpo

Every weight trains. The reference policy is a frozen copy of the starting model, sharded like
the policy (so each rank holds 1/W of it), built from ``ref_checkpointer`` when the config has
one, else from the same checkpoint as the policy. SimPO has no reference, and none is built.
The loss of a step is the mean over all ranks' pairs, as in ``lora_dpo_distributed``.

Step checkpoints (``save_every_n_steps``), ``max_steps`` and ``resume_from_checkpoint=True``
alone as in the other recipes. Resuming reads the policy from the checkpoint resumed (the
latest complete one, or ``checkpointer.checkpoint_dir``), so the reference must then come from
the original model: ``ref_checkpointer`` is required, e.g. a copy of the first run's
``checkpointer`` node.
"""

import logging
import os
import sys
import time
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from torchtune import config, rlhf, training, utils
from torchtune.data import padded_collate_pairs, padding_id
from torchtune.modules import TransformerDecoderLayer

log = logging.getLogger(__name__)


class FullDPORecipeDistributed:
    """Full-weight preference tuning of a decoder sharded with FSDP2 over torchrun workers.

    Args:
        cfg: the recipe config: ``tiny/full_distributed``'s keys with a
            ``torchtune.datasets.preference_dataset``, a ``torchtune.rlhf`` loss and optionally
            ``ref_checkpointer``.

    Raises:
        ValueError: on bad loop values, without torchrun's environment, or resuming a loss that
            needs a reference without ``ref_checkpointer``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._compile_models = bool(cfg.get("compile", False))  # policy and reference
        self._device, self._dtype, self._world_size, self._rank = training.init_distributed_device(
            cfg.device, cfg.dtype
        )
        self._loop = training.LoopSettings.from_config(cfg)
        seed = utils.set_seed(utils.broadcast_object(utils.set_seed(cfg.seed)))
        self._state = training.RecipeState.from_config(cfg, seed=seed)

    @property
    def _is_rank_zero(self) -> bool:
        return self._rank == 0

    def setup(self, cfg: DictConfig) -> None:
        """Build the policy, the reference, the data and the optimizer; on resume, restore the
        recipe state last."""
        self._metric_logger = config.instantiate(cfg.metric_logger) if self._is_rank_zero else None
        self._loss_fn = config.instantiate(cfg.loss)
        ref_cfg = cfg.get("ref_checkpointer")
        if self._loop.resume and self._loss_fn.needs_reference and ref_cfg is None:
            raise ValueError(
                "resume_from_checkpoint=True needs ref_checkpointer (the original model, the "
                "reference); checkpointer now reads the trained epoch"
            )
        self._checkpointer = training.build_checkpointer(cfg)
        ckpt = training.load_checkpoint_on_rank_zero(self._checkpointer, self._is_rank_zero)
        if self._loop.resume:
            self._state = self._state.resumed_from(ckpt)
            utils.set_seed(self._state.seed)
        policy_sd = ckpt.pop("model", None)
        ref_sd = None
        if self._loss_fn.needs_reference:
            if ref_cfg is not None:
                ref_ckpt = training.load_checkpoint_on_rank_zero(
                    config.instantiate(ref_cfg), self._is_rank_zero
                )
                ref_sd = ref_ckpt.pop("model", None)
            elif self._is_rank_zero:
                ref_sd = dict(policy_sd)  # loading consumes the dict, not the tensors
        self._model = self._sharded_model(cfg.model, policy_sd, cfg.enable_activation_checkpointing)
        del policy_sd
        self._ref_model: Optional[nn.Module] = None
        if self._loss_fn.needs_reference:
            self._ref_model = self._sharded_model(cfg.model, ref_sd, False).eval()
            self._ref_model.requires_grad_(False)
        del ref_sd
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
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

    def _sharded_model(
        self,
        cfg_model: DictConfig,
        full_sd: Optional[Dict[str, torch.Tensor]],
        enable_activation_checkpointing: Any,
    ) -> nn.Module:
        """A model sharded per decoder layer, filled from rank 0's ``full_sd``."""
        with utils.set_default_dtype(torch.float32), torch.device("meta"):
            model = config.instantiate(cfg_model)
        utils.apply_activation_checkpointing(model, enable_activation_checkpointing)
        if self._compile_models:  # `compile: true`; lazy, the first forward compiles
            utils.compile_layers(model)
        param_dtype = self._dtype if self._dtype != torch.float32 else None
        utils.shard_model(
            model, self._device, layer_types=(TransformerDecoderLayer,), param_dtype=param_dtype
        )
        model.to_empty(device=self._device)
        utils.load_from_full_state_dict(model, full_sd)
        return model

    def _reference_logps(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return rlhf.sequence_logps(self._ref_model, batch, self._device, pairs=True)

    def train(self) -> None:
        """Run the remaining epochs; rank 0 logs every ``log_every_n_steps`` optimizer steps."""
        state, steps_per_epoch = self._state, self._steps_per_epoch
        reference = self._reference_logps if self._ref_model is not None else None
        step = partial(
            rlhf.preference_step,
            self._model,
            self._loss_fn,
            self._optimizer,
            params=list(self._model.parameters()),  # a list: every step clips it
            device=self._device,
            reference=reference,
            world_size=self._world_size,
            clip_grad_norm=self._loop.clip_grad_norm,
            lr_scheduler=self._lr_scheduler,
            oom=self._oom,
        )
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
                metrics = step(micro_batches)
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
        """Gather the policy on rank 0 and write it there (plus, unless this was the last
        end of the run, the state to resume from). Every rank must call this."""
        last = self._state.finished
        ckpt: Dict[str, Any] = {"model": utils.gather_full_state_dict(self._model, self._dtype)}
        if not last:
            ckpt.update(self._state.state_dict(self._device))
            ckpt["optimizer"] = utils.gather_optimizer_state_dict(self._model, self._optimizer)
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
    recipe = FullDPORecipeDistributed(cfg)
    if recipe._is_rank_zero:
        log.info("Config:\n%s", OmegaConf.to_yaml(cfg))
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
