# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Generate text from a prompt with a (fine-tuned) model.

    tune generate --config generate prompt="Tell me a joke."
    tune generate --config tiny/generate temperature=0 max_new_tokens=20

The model comes through the same checkpointers as fine-tuning (a base model, a full fine-tune,
or a base model plus a LoRA adapter, merged on load). ``prompt`` is used as is, or, with
``instruct_template`` set (e.g. ``torchtune.data.AlpacaInstructTemplate``), as the instruction
of that template. Decoding is greedy with ``temperature: 0`` and samples otherwise (``top_k``,
``top_p``, reproducible through ``seed``). It stops at EOS, at any of ``stop_strings`` or after
``max_new_tokens``. The generated text goes to stdout, followed by the speed in tokens/s.
"""

import logging
import sys
import time
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from torchtune import config, utils
from torchtune.data import padding_id
from torchtune.modules.peft import get_adapter_params, merge_lora_in_place

log = logging.getLogger(__name__)


class GenerateRecipe:
    """Load a model through a checkpointer and continue one prompt.

    Args:
        cfg: the recipe config; see ``recipes/configs/generate.yaml``.

    Raises:
        ValueError: on an empty prompt or bad sampling settings.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(cfg.device)
        self._dtype = utils.get_dtype(cfg.dtype, self._device)
        self._seed = utils.set_seed(cfg.seed)
        if not isinstance(cfg.prompt, str) or not cfg.prompt:
            raise ValueError(f"Config key 'prompt' must be a non-empty string, got {cfg.prompt!r}")
        self._max_new_tokens = int(cfg.max_new_tokens)
        self._temperature = float(cfg.temperature)
        self._top_k = None if cfg.top_k is None else int(cfg.top_k)
        self._top_p = None if cfg.top_p is None else float(cfg.top_p)
        if self._max_new_tokens < 1:
            raise ValueError(f"Config key 'max_new_tokens' must be >= 1, got {cfg.max_new_tokens}")
        if self._temperature < 0:
            raise ValueError(
                f"Config key 'temperature' must be >= 0 (0 = greedy), got {cfg.temperature}"
            )
        if self._top_k is not None and self._top_k < 1:
            raise ValueError(f"Config key 'top_k' must be >= 1 or null, got {cfg.top_k}")
        if self._top_p is not None and not 0 < self._top_p <= 1:
            raise ValueError(f"Config key 'top_p' must be in (0, 1] or null, got {cfg.top_p}")
        self._stop_strings = [str(s) for s in (cfg.stop_strings or []) if str(s)]

    def setup(self, cfg: DictConfig) -> None:
        checkpointer = config.instantiate(cfg.checkpointer)
        ckpt = checkpointer.load_checkpoint()
        self._model = self._setup_model(cfg.model, ckpt["model"], ckpt.get("adapter"))
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._prompt = self._format_prompt(cfg.prompt, cfg.instruct_template, cfg.instruct_input)

    def _setup_model(
        self,
        cfg_model: DictConfig,
        model_sd: Dict[str, torch.Tensor],
        adapter_sd: Optional[Dict[str, torch.Tensor]],
    ) -> nn.Module:
        with utils.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)
        has_lora = bool(get_adapter_params(model))
        if has_lora != (adapter_sd is not None):
            raise ValueError(
                f"Model '{cfg_model._component_}' {'has' if has_lora else 'has no'} LoRA layers but "
                f"checkpointer.adapter_checkpoint is {'not ' if adapter_sd is None else ''}set; a LoRA "
                "model needs its adapter file, a base model builder needs none"
            )
        missing, unexpected = model.load_state_dict(
            {**model_sd, **(adapter_sd or {})}, strict=False
        )
        if missing or unexpected:
            raise ValueError(
                f"Checkpoint does not fit model '{cfg_model._component_}': missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        if has_lora:
            model = merge_lora_in_place(model)
        return model.eval()

    @staticmethod
    def _format_prompt(prompt: str, template: Optional[DictConfig], input_: Optional[str]) -> str:
        if template is None:
            return prompt
        return config.instantiate(template).format({"instruction": prompt, "input": input_ or ""})

    def generate(self) -> str:
        """Generate, print the text and the speed, and return the text."""
        tokens = self._tokenizer.encode(self._prompt, add_bos=True, add_eos=False)
        generator = torch.Generator(device=self._device).manual_seed(self._seed)
        stop_fn = None
        if self._stop_strings:

            def stop_fn(new: List[int]) -> bool:
                text = self._tokenizer.decode(new)
                return any(s in text for s in self._stop_strings)

        t0 = time.perf_counter()
        (new,) = utils.generate(
            self._model,
            [tokens],
            self._max_new_tokens,
            temperature=self._temperature,
            top_k=self._top_k,
            top_p=self._top_p,
            stop_tokens=[self._tokenizer.eos_id],
            pad_id=padding_id(self._tokenizer),
            generator=generator,
            stop_fn=stop_fn,
        )
        elapsed = time.perf_counter() - t0
        text = self._tokenizer.decode(new)
        for s in self._stop_strings:
            text = text.split(s)[0]
        print(text)
        print(
            f"\n[{len(new)} tokens in {elapsed:.2f} s: {len(new) / max(elapsed, 1e-9):.1f} tokens/s; "
            f"prompt {len(tokens)} tokens]"
        )
        if self._device.type == "cuda":
            log.info("Memory: %s", utils.get_memory_stats(self._device))
        return text


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    recipe.generate()


if __name__ == "__main__":
    sys.exit(recipe_main())
