# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""README's Quickstart, the CLI table and .ci/run agree with each other and with the registry."""

import re
from pathlib import Path

from torchtune import _recipe_registry as registry

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text()


def _quickstart_blocks():
    section = README.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash)?\n(.*?)```", section, flags=re.S)


def test_quickstart_has_two_blocks_and_second_is_the_test_command():
    blocks = _quickstart_blocks()
    assert len(blocks) >= 2
    test_command = blocks[1].strip()
    assert "\n" not in test_command
    assert "torch==2.13.0" in test_command and "pytest" in test_command


def test_ci_runs_exactly_the_readme_test_command():
    test_command = _quickstart_blocks()[1].strip()
    script = (ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip()
        for line in script.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert commands[-1] == test_command
    assert script.startswith("#!/usr/bin/env bash")


def test_readme_table_lists_every_recipe_and_config():
    section = README.split("\n## Recipes and configs\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", section, flags=re.M))
    assert list(rows) == registry.recipe_names()
    for recipe in registry.RECIPES:
        assert re.findall(r"`([^`]+)`", rows[recipe.name]) == [c.name for c in recipe.configs]


def test_readme_shows_the_cli_usage():
    assert "usage: tune [options] <recipe> [recipe_args]" in README
    for command in ("tune ls", "tune cp", "tune validate --config", "tune download --repo-id"):
        assert command in README
