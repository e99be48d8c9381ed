# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Generate text from a prompt or a conversation with a (fine-tuned) model.

    tune generate --config generate prompt="Tell me a joke."
    tune generate --config tiny/generate temperature=0 max_new_tokens=20
    tune generate --config <cfg> prompt=null 'messages=[{role: user, content: "Hi!"}]'

The model comes through the same checkpointers as fine-tuning (a base model, a full fine-tune,
or a base model plus a LoRA adapter, merged on load). A folder a training run wrote
(``checkpointer.checkpoint_dir=<output_dir>/epoch_N``, which holds the merged model) loads as
it is: with ``checkpoint_files: null`` its files are found. ``prompt`` is used as is, or, with
``instruct_template`` set (e.g. ``torchtune.data.AlpacaInstructTemplate``), as the instruction
of that template. A conversation (``messages``: a list of ``{role, content}``, with ``prompt``
null; or ``chat: true``, which makes ``prompt`` one user turn) is rendered by the tokenizer's
chat template with the assistant's turn opened; that needs a tokenizer with a chat template
(``torchtune.models.hf_tokenizer``). Decoding is greedy with ``temperature: 0`` and samples
otherwise (``top_k``, ``top_p``, reproducible through ``seed``). It stops at any of the
tokenizer's ``stop_token_ids`` (EOS where it has none), at any of ``stop_strings`` or after
``max_new_tokens``. The new text goes to stdout, followed by the speed in tokens/s.
"""

import logging
import sys
import time
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from torchtune import config, utils
from torchtune.data import padding_id
from torchtune.modules.peft import get_adapter_params, merge_lora_in_place

log = logging.getLogger(__name__)


class GenerateRecipe:
    """Load a model through a checkpointer and continue one prompt or conversation.

    Args:
        cfg: the recipe config; see ``recipes/configs/generate.yaml``.

    Raises:
        ValueError: on an empty prompt, both or neither of ``prompt`` and ``messages``, a bad
            message, a conversation with a tokenizer that has no chat template, or bad
            sampling settings.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(cfg.device)
        self._dtype = utils.get_dtype(cfg.dtype, self._device)
        self._seed = utils.set_seed(cfg.seed)
        # Configs written before conversations existed have neither key.
        self._messages = _conversation(cfg.prompt, cfg.get("messages"), cfg.get("chat", False))
        if self._messages is not None and cfg.get("instruct_template") is not None:
            raise ValueError(
                "Config key 'instruct_template' formats a plain prompt; a conversation "
                "('messages' or 'chat: true') is formatted by the tokenizer's chat template. "
                "Set instruct_template=null"
            )
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
        # The tokenizer first: a conversation it cannot render fails before any weights load.
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._prompt_tokens = self._setup_prompt(cfg)
        checkpointer = config.instantiate(cfg.checkpointer)
        ckpt = checkpointer.load_checkpoint()
        self._model = self._setup_model(cfg.model, ckpt["model"], ckpt.get("adapter"))

    def _setup_prompt(self, cfg: DictConfig) -> List[int]:
        if self._messages is None:
            text = self._format_prompt(cfg.prompt, cfg.instruct_template, cfg.instruct_input)
            return self._tokenizer.encode(text, add_bos=True, add_eos=False)
        if not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(
                f"A conversation ('messages' or 'chat: true') needs a tokenizer with a chat "
                f"template, and tokenizer '{cfg.tokenizer._component_}' has none. Use "
                "torchtune.models.hf_tokenizer with the model's Hugging Face folder (tokenizer.json "
                "and a tokenizer_config.json with a chat_template), or give a plain prompt"
            )
        # The template writes its own BOS, so the text is encoded without adding one. Rendered,
        # not tokenize_messages: no loss mask is needed, and its prefix checks would refuse
        # templates (Qwen 3's) that render earlier turns differently, which is fine here.
        text = self._tokenizer.render(self._messages, add_generation_prompt=True)
        return self._tokenizer.encode(text, add_bos=False, add_eos=False)

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
                f"Checkpoint does not fit model '{cfg_model._component_}': missing "
                f"{_first(missing)}, unexpected {_first(unexpected)}. The checkpoint is for another "
                "model: give the model builder and sizes that match checkpointer.checkpoint_dir "
                "(its config.json)"
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
        """Generate, print the new text and the speed, and return the new text."""
        tokens = self._prompt_tokens
        # Chat models end a turn with a token of their own (e.g. Llama 3's <|eot_id|>), which the
        # HF tokenizer lists next to EOS; the SentencePiece tokenizer has only EOS.
        stop_tokens = getattr(self._tokenizer, "stop_token_ids", None) or [self._tokenizer.eos_id]
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
            stop_tokens=stop_tokens,
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


def _conversation(prompt: Any, messages: Any, chat: bool) -> Optional[List[Dict[str, str]]]:
    """The conversation to render (None for a plain prompt), from the config's ``prompt``,
    ``messages`` and ``chat`` keys, checked: exactly one of ``prompt`` and ``messages``, and
    every message a ``{role, content}`` mapping of strings (errors name the message index)."""
    if (prompt is None) == (messages is None):
        raise ValueError(
            "Give exactly one of config keys 'prompt' and 'messages' (set the other to null); got "
            f"prompt={prompt!r} and messages={'null' if messages is None else '[...]'}"
        )
    if messages is None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"Config key 'prompt' must be a non-empty string, got {prompt!r}")
        return [{"role": "user", "content": prompt}] if chat else None
    if not OmegaConf.is_list(messages) and not isinstance(messages, list):
        raise ValueError(
            f"Config key 'messages' must be a list of {{role, content}}, got {messages!r}"
        )
    messages = OmegaConf.to_container(messages) if OmegaConf.is_list(messages) else messages
    if not messages:
        raise ValueError("Config key 'messages' is an empty list; give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise ValueError(
                f"messages[{i}] must be a mapping with 'role' and 'content', got {m!r}"
            )
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"messages[{i}].role must be a non-empty string, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {m['content']!r}")
    return messages


def _first(keys: List[str], n: int = 4) -> str:
    """``keys`` for a message: the count and the first ``n``, sorted."""
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"{len(keys)} keys {keys[:n]}{more}" if keys else "none"


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    recipe.generate()


if __name__ == "__main__":
    sys.exit(recipe_main())
