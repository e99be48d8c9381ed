# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Turning the recipe and config names a user types into files."""

import os
from pathlib import Path

from torchtune import _recipe_registry as registry


class CLIError(Exception):
    """A user error: printed as ``tune: error: <message>``, exit with ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _looks_like_path(name: str, suffixes) -> bool:
    return name.endswith(suffixes) or os.sep in name or (os.altsep or os.sep) in name


def _unknown(kind: str, name: str, candidates) -> CLIError:
    matches = registry.close_matches(name, candidates)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    return CLIError(
        f"unknown {kind} '{name}'.{hint} Run 'tune ls' to see the packaged recipes and configs."
    )


def _packaged(kind: str, name: str, path: Path) -> Path:
    if not path.is_file():
        raise CLIError(
            f"packaged {kind} '{name}' is missing from this installation ({path} does not exist); "
            "reinstall torchtune",
            code=1,
        )
    return path


def resolve_recipe(name: str) -> Path:
    """A recipe given as a packaged name (``lora_finetune_single_device``) or a path to a ``.py``.

    Raises:
        CLIError: for an unknown name (with close matches) or a missing file.
    """
    if not _looks_like_path(name, (".py",)):
        recipe = registry.get_recipe(name)
        if recipe is None:
            raise _unknown("recipe", name, registry.recipe_names())
        return _packaged("recipe", name, recipe.file_path)
    path = Path(name)
    if path.is_file():
        return path
    recipe = registry.get_recipe(name)
    if recipe is not None:
        return _packaged("recipe", name, recipe.file_path)
    raise CLIError(f"recipe file not found: {name}. Run 'tune ls' to see the packaged recipes.")


def resolve_config(name: str) -> Path:
    """A config given as a packaged name (``llama2/7B_lora``) or a path to a ``.yaml``.

    An existing file wins over a packaged name.

    Raises:
        CLIError: for an unknown name (with close matches) or a missing file.
    """
    path = Path(name)
    if path.is_file():
        return path
    config = registry.get_config(name)
    if config is not None:
        return _packaged("config", name, config.file_path)
    if name.endswith((".yaml", ".yml")):
        matches = registry.close_matches(name, registry.config_names())
        hint = f" Packaged configs with a similar name: {', '.join(matches)}." if matches else ""
        raise CLIError(
            f"config file not found: {name}.{hint} Run 'tune ls' to see the packaged configs."
        )
    raise _unknown("config", name, registry.config_names())
