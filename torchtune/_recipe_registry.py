# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The single list of recipes and configs that ship inside the torchtune package.

`tune ls`, `tune cp`, `tune run` and `tune validate` resolve names through this file only.
A recipe ``name`` lives at ``torchtune/recipes/<name>.py`` and a config ``name`` at
``torchtune/recipes/configs/<name>.yaml`` (config names may contain ``/``). An alias is a second
name for a config file (``lora_finetune_single_device`` is ``llama2/7B_lora_single_device``):
one file, so the two cannot drift apart.
"""

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

__all__ = [
    "RECIPES_DIR",
    "CONFIGS_DIR",
    "Recipe",
    "Config",
    "RECIPES",
    "get_recipe",
    "get_config",
    "recipe_names",
    "config_names",
    "close_matches",
]

RECIPES_DIR = Path(__file__).parent / "recipes"
CONFIGS_DIR = RECIPES_DIR / "configs"


@dataclass(frozen=True)
class Config:
    name: str
    alias_of: Optional[str] = None  # the config whose file this name reads

    @property
    def file_path(self) -> Path:
        return CONFIGS_DIR / f"{self.alias_of or self.name}.yaml"


@dataclass(frozen=True)
class Recipe:
    name: str
    configs: Tuple[Config, ...]
    supports_distributed: bool

    @property
    def file_path(self) -> Path:
        return RECIPES_DIR / f"{self.name}.py"


def _recipe(
    name: str, configs: List[Union[str, Tuple[str, str]]], supports_distributed: bool
) -> Recipe:
    """``configs``: names, or ``(alias, target)`` pairs for a second name of a file."""
    return Recipe(
        name,
        tuple(Config(c) if isinstance(c, str) else Config(*c) for c in configs),
        supports_distributed,
    )


RECIPES: Tuple[Recipe, ...] = (
    _recipe(
        "full_finetune_single_device",
        [
            ("full_finetune_single_device", "llama2/7B_full_single_device"),
            "llama2/7B_full_single_device",
            "llama3_2/1B_full_single_device",
            "qwen2_5/0_5B_full_single_device",
            "qwen3/0_6B_full_single_device",
            "smollm2/135M_full_single_device",
            "phi3/mini_full_single_device",
            "gemma2/2B_full_single_device",
            "gemma3/1B_full_single_device",
            "gemma3/4B_full_single_device",
            "tiny/full",
        ],
        supports_distributed=False,
    ),
    _recipe(
        "lora_finetune_single_device",
        [
            ("lora_finetune_single_device", "llama2/7B_lora_single_device"),
            "llama2/7B_lora_single_device",
            "llama3_2/1B_lora_single_device",
            "llama3_1/8B_lora_single_device",
            "llama3_1/8B_qlora_single_device",
            "mistral/7B_lora_single_device",
            "qwen2_5/0_5B_lora_single_device",
            "qwen2_5/7B_lora_single_device",
            "qwen3/0_6B_lora_single_device",
            "qwen3/8B_lora_single_device",
            "qwen3/8B_qlora_single_device",
            "smollm2/1_7B_lora_single_device",
            "phi3/mini_lora_single_device",
            "phi4/mini_lora_single_device",
            "phi4/14B_lora_single_device",
            "gemma2/2B_lora_single_device",
            "gemma2/9B_lora_single_device",
            "gemma3/1B_lora_single_device",
            "gemma3/4B_lora_single_device",
            "tiny/lora",
            "tiny/qlora",
            "tiny/dora",
        ],
        supports_distributed=False,
    ),
    _recipe(
        "full_finetune_distributed",
        [
            ("full_finetune_distributed", "llama2/7B_full"),
            "llama2/7B_full",
            "llama3_1/8B_full",
            "mistral/7B_full",
            "tiny/full_distributed",
        ],
        supports_distributed=True,
    ),
    _recipe(
        "lora_finetune_distributed",
        [
            ("lora_finetune_distributed", "llama2/7B_lora"),
            "llama2/7B_lora",
            "llama2/13B_lora",
            "llama3_1/8B_lora",
            "llama3_3/70B_qlora",
            "tiny/lora_distributed",
        ],
        supports_distributed=True,
    ),
    _recipe(
        "lora_dpo_single_device",
        [
            "llama3_1/8B_lora_dpo_single_device",
            "qwen3/8B_lora_dpo_single_device",
            "tiny/lora_dpo",
        ],
        supports_distributed=False,
    ),
    _recipe(
        "lora_dpo_distributed",
        ["llama3_1/8B_lora_dpo", "qwen3/8B_lora_dpo", "tiny/lora_dpo_distributed"],
        supports_distributed=True,
    ),
    _recipe(
        "full_dpo_distributed",
        ["llama3_1/8B_full_dpo", "qwen3/8B_full_dpo", "tiny/full_dpo"],
        supports_distributed=True,
    ),
    _recipe("eleuther_eval", ["eleuther_eval", "tiny/eval"], supports_distributed=False),
    _recipe("generate", ["generate", "tiny/generate"], supports_distributed=False),
)


def recipe_names() -> List[str]:
    return [r.name for r in RECIPES]


def config_names() -> List[str]:
    return [c.name for r in RECIPES for c in r.configs]


def get_recipe(name: str) -> Optional[Recipe]:
    """Packaged recipe called ``name`` (a trailing ``.py`` is allowed), or None."""
    name = name[:-3] if name.endswith(".py") else name
    return next((r for r in RECIPES if r.name == name), None)


def get_config(name: str) -> Optional[Config]:
    """Packaged config called ``name`` (a trailing ``.yaml`` is allowed), or None."""
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    return next((c for r in RECIPES for c in r.configs if c.name == name), None)


def close_matches(name: str, candidates: List[str], n: int = 3) -> List[str]:
    """Names in ``candidates`` that look like ``name`` (for "did you mean" hints)."""
    stem = name.rsplit(".", 1)[0] if name.endswith((".py", ".yaml")) else name
    return difflib.get_close_matches(stem, candidates, n=n, cutoff=0.5)
