# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The registry is the single list of what ships: it and the files on disk must agree."""

import pytest

from torchtune import _recipe_registry as registry

CONTRACT_RECIPES = [
    "full_finetune_single_device",
    "lora_finetune_single_device",
    "full_finetune_distributed",
    "lora_finetune_distributed",
    "lora_dpo_single_device",
    "lora_dpo_distributed",
    "full_dpo_distributed",
    "eleuther_eval",
    "generate",
]


def test_names_are_unique_and_match_the_contract():
    assert registry.recipe_names() == CONTRACT_RECIPES
    names = registry.config_names()
    assert len(names) == len(set(names))


def test_lookup_accepts_suffixes():
    assert registry.get_recipe("generate.py").name == "generate"
    assert registry.get_config("llama2/7B_lora.yaml").name == "llama2/7B_lora"
    assert registry.get_recipe("nope") is None and registry.get_config("nope") is None
    assert registry.get_config("tiny/lora").file_path == registry.CONFIGS_DIR / "tiny" / "lora.yaml"


@pytest.mark.parametrize("recipe", registry.RECIPES, ids=lambda r: r.name)
def test_registered_files_exist(recipe):
    missing = [
        str(p)
        for p in [recipe.file_path, *(c.file_path for c in recipe.configs)]
        if not p.is_file()
    ]
    assert missing == []


def test_every_shipped_file_is_registered():
    registered = {r.file_path for r in registry.RECIPES} | {
        c.file_path for r in registry.RECIPES for c in r.configs
    }
    shipped = {p for p in registry.RECIPES_DIR.glob("*.py") if p.name != "__init__.py"}
    shipped |= set(registry.CONFIGS_DIR.rglob("*.yaml"))
    assert sorted(map(str, shipped - registered)) == []


@pytest.mark.parametrize("name", registry.config_names())
def test_config_begins_with_its_command(name):
    config = registry.get_config(name)
    path = config.file_path
    if not path.is_file():
        pytest.skip("not written yet (test_registered_files_exist fails for it)")
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "tune " in first and (config.alias_of or name) in first, first


def test_aliases_name_a_registered_config_of_the_same_recipe():
    aliases = [(r, c) for r in registry.RECIPES for c in r.configs if c.alias_of]
    assert aliases
    for recipe, alias in aliases:
        target = registry.get_config(alias.alias_of)
        assert target is not None and target.alias_of is None
        assert target in recipe.configs
        assert alias.file_path == target.file_path


def test_no_two_shipped_config_files_are_the_same_but_for_their_first_line():
    bodies = {}
    for path in sorted(registry.CONFIGS_DIR.rglob("*.yaml")):
        body = path.read_text().split("\n", 1)[1]
        assert body not in bodies, f"{path} repeats {bodies.get(body)}: make one an alias"
        bodies[body] = path
