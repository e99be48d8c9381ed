# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune ls``: the packaged recipes and the configs that go with each."""

import argparse
from typing import List

from torchtune import _recipe_registry as registry


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="tune ls",
        description="List the recipes shipped with torchtune and the configs for each.",
    )


def table() -> str:
    rows = [("RECIPE", "CONFIG")]
    for recipe in registry.RECIPES:
        for i, config in enumerate(recipe.configs):
            name = config.name + (f" (= {config.alias_of})" if config.alias_of else "")
            rows.append((recipe.name if i == 0 else "", name))
    width = max(len(r[0]) for r in rows) + 3
    return "\n".join(f"{a:<{width}}{b}".rstrip() for a, b in rows)


def main(argv: List[str]) -> int:
    build_parser().parse_args(argv)
    print(table())
    return 0
