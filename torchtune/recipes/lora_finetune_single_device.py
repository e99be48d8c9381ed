# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""LoRA fine-tuning on one device.

    tune lora_finetune_single_device --config lora_finetune_single_device
    tune lora_finetune_single_device --config tiny/lora epochs=1

The base model is frozen; only the LoRA matrices train, and only they are in the optimizer.
The loss of an optimizer step is the sum of token cross-entropies over all its micro-batches
divided by the number of scored tokens in the whole step, so ``gradient_accumulation_steps=k``
gives exactly the gradient of a k-times larger batch (batches left over at the end of an
epoch that do not fill a step are skipped).

At the end of every epoch ``output_dir/epoch_N/`` receives the merged model in the format the
base came in, ``adapter.safetensors`` (our keys) and PEFT's ``adapter_model.safetensors`` +
``adapter_config.json`` (in the checkpointer's ``adapter/`` subfolder), plus, except after the
last epoch, ``recipe_state.pt``. To resume, keep the base checkpoint and add
``checkpointer.adapter_checkpoint=<output_dir>/epoch_N/adapter.safetensors
checkpointer.recipe_checkpoint=<output_dir>/epoch_N/recipe_state.pt resume_from_checkpoint=True``.
"""

import logging
import sys
import time
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from torchtune import config, training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate
from torchtune.modules.peft import get_adapter_params, get_merged_lora_ckpt, set_trainable_params

log = logging.getLogger(__name__)

# Recipe state stored with intermediate checkpoints, beside "model" and "optimizer".
_RECIPE_STATE_KEYS = ("epochs_run", "total_epochs", "max_steps_per_epoch", "seed", "global_step")


class LoRAFinetuneRecipeSingleDevice:
    """LoRA fine-tuning of a decoder on one device (CPU, one GPU or MPS).

    ``checkpointer.adapter_checkpoint``, when set, gives the adapter to start from (always
    the case on resume; otherwise the adapters start as the model builder initialises them).

    Args:
        cfg: the recipe config; see ``recipes/configs/lora_finetune_single_device.yaml``.

    Raises:
        ValueError: on bad values of ``gradient_accumulation_steps``, ``epochs``,
            ``log_every_n_steps``, ``device``, ``dtype``, or a model config without
            ``lora_rank``/``lora_alpha``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(cfg.device)
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
        self.seed = utils.set_seed(cfg.seed)
        self.total_epochs = int(cfg.epochs)
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.epochs_run = 0
        self.global_step = 0

    def setup(self, cfg: DictConfig) -> None:
        """Build everything from the config; on resume, restore the recipe state last."""
        self._metric_logger = config.instantiate(cfg.metric_logger)
        ckpt = self._load_checkpoint(cfg.checkpointer)
        if self._resume:
            self._check_recipe_state(ckpt)
        self._model = self._setup_model(
            cfg.model,
            cfg.enable_activation_checkpointing,
            ckpt["model"],
            ckpt.get("adapter"),
            compile_layers=bool(cfg.get("compile", False)),
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = self._setup_optimizer(cfg.optimizer, ckpt.get("optimizer"))
        self._loss_fn = config.instantiate(cfg.loss)
        self._sampler, self._dataloader = self._setup_data(cfg.dataset, cfg.shuffle, cfg.batch_size)
        self._steps_per_epoch = self._count_steps_per_epoch()
        self._lr_scheduler = self._setup_lr_scheduler(cfg.lr_scheduler)
        if self._resume:
            # Last: building the model above drew from the RNG; training continues from here.
            torch.set_rng_state(ckpt["rng_state"])
            if self._device.type == "cuda" and "cuda_rng_state" in ckpt:
                torch.cuda.set_rng_state(ckpt["cuda_rng_state"], self._device)
        log.info("Memory after setup: %s", utils.get_memory_stats(self._device))

    def _load_checkpoint(self, cfg_checkpointer: DictConfig) -> Dict[str, Any]:
        self._checkpointer = config.instantiate(
            cfg_checkpointer, resume_from_checkpoint=self._resume
        )
        return self._checkpointer.load_checkpoint()

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
        if adapter_sd is not None:
            if set(adapter_sd) != set(self._adapter_params):
                raise ValueError(
                    "Adapter checkpoint does not fit the model: missing "
                    f"{sorted(set(self._adapter_params) - set(adapter_sd))}, unexpected "
                    f"{sorted(set(adapter_sd) - set(self._adapter_params))}"
                )
            model.load_state_dict(adapter_sd, strict=False)
        elif self._resume:
            raise ValueError("resume_from_checkpoint=True needs checkpointer.adapter_checkpoint")
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

    def _setup_optimizer(
        self, cfg_optimizer: DictConfig, opt_state: Optional[Dict[str, Any]]
    ) -> torch.optim.Optimizer:
        optimizer = config.instantiate(cfg_optimizer, list(self._adapter_params.values()))
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        return optimizer

    def _setup_data(
        self, cfg_dataset: DictConfig, shuffle: bool, batch_size: int
    ) -> Tuple[DistributedSampler, DataLoader]:
        ds = config.instantiate(cfg_dataset, tokenizer=self._tokenizer)
        # A one-replica DistributedSampler: its order depends only on (seed, epoch), so a
        # resumed run sees the same later epochs as an uninterrupted one.
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=shuffle, seed=self.seed)
        collate = partial(padded_collate, padding_idx=self._tokenizer.pad_id)
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate)
        log.info("Dataset: %d samples, %d batches of %d", len(ds), len(loader), batch_size)
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

    def _optimizer_step(self, micro_batches: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over its micro-batches; returns the step's mean token loss."""
        # Counted up front so each micro-batch's backward is already scaled for the whole step.
        num_tokens = sum(
            int((mb["labels"][:, 1:] != CROSS_ENTROPY_IGNORE_IDX).sum()) for mb in micro_batches
        )
        denom = max(num_tokens, 1)
        total = torch.zeros((), device=self._device)
        for mb in micro_batches:
            loss_sum, _ = self._loss_sum(mb)
            (loss_sum / denom).backward()
            total += loss_sum.detach()
        if self._clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(
                self._adapter_params.values(), max_norm=float(self._clip_grad_norm)
            )
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return total / denom

    def train(self) -> None:
        """Run the remaining epochs, logging every ``log_every_n_steps`` optimizer steps."""
        if self.epochs_run >= self.total_epochs:
            log.info("Nothing to do: %d of %d epochs run", self.epochs_run, self.total_epochs)
        for epoch in range(self.epochs_run, self.total_epochs):
            self._sampler.set_epoch(epoch)
            batches = iter(self._dataloader)
            pbar = tqdm(total=self._steps_per_epoch, desc=f"epoch {epoch + 1}/{self.total_epochs}")
            for _ in range(self._steps_per_epoch):
                micro_batches = [next(batches) for _ in range(self._grad_accum)]
                lr = self._optimizer.param_groups[0]["lr"]  # the lr this step uses
                t0 = time.perf_counter()
                loss = self._optimizer_step(micro_batches).item()  # a device sync point
                elapsed = time.perf_counter() - t0
                self.global_step += 1
                n_tokens = sum(mb["tokens"].numel() for mb in micro_batches)  # incl. padding
                tokens_per_second = n_tokens / max(elapsed, 1e-9)
                pbar.update(1)
                pbar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}"
                )
                if self.global_step % self._log_every_n_steps == 0:
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
        log.info("Peak memory: %s", utils.get_memory_stats(self._device))

    def save_checkpoint(self, epoch: int) -> None:
        """Save the merged model and the adapter (plus, unless this was the last epoch, the
        state to resume from)."""
        state_dict = {k: v.detach().cpu() for k, v in self._model.state_dict().items()}
        adapter = {k: state_dict[k] for k in self._adapter_params}
        ckpt: Dict[str, Any] = {
            "model": get_merged_lora_ckpt(state_dict, self._lora_rank, self._lora_alpha),
            "adapter": adapter,
            "adapter_config": {
                "r": self._lora_rank,
                "lora_alpha": self._lora_alpha,
                # "layers.0.attn.q_proj.lora_a.weight" -> "q_proj"
                "target_modules": sorted({k.split(".")[-3] for k in adapter}),
            },
        }
        intermediate = self.epochs_run < self.total_epochs
        if intermediate:
            ckpt.update(self._recipe_state())
        self._checkpointer.save_checkpoint(ckpt, epoch=epoch, intermediate_checkpoint=intermediate)

    def _recipe_state(self) -> Dict[str, Any]:
        state = {
            "optimizer": self._optimizer.state_dict(),
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
