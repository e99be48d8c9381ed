# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune cp``: copy a packaged recipe or config somewhere to edit it."""

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import List

from torchtune import _recipe_registry as registry
from torchtune._cli._names import CLIError

_CONFIG_SUFFIXES = (".yaml", ".yml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune cp",
        usage="tune cp <recipe|config>[.py|.yaml] <destination> [--force] [--make-parents]",
        description=(
            "Copy a packaged recipe (.py) or config (.yaml) to <destination>, a file or an "
            "existing folder. Missing parent folders are created. A name that is both a "
            "recipe and a config needs its .py or .yaml suffix (or a destination that has one)."
        ),
        epilog="examples:\n  tune cp full_finetune_distributed.py my_recipe/full_finetune_distributed.py\n"
        "  tune cp llama2/7B_lora.yaml my_configs/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="packaged recipe or config name, see 'tune ls'")
    parser.add_argument("destination", help="file or folder to copy to")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite an existing file")
    parser.add_argument(
        "-p",
        "--make-parents",
        action="store_true",
        help="create missing parent folders (always done; accepted for familiarity)",
    )
    return parser


def _source(name: str, destination: str) -> Path:
    stem = name
    for suffix in (".py", *_CONFIG_SUFFIXES):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
    recipe = None if name.endswith(_CONFIG_SUFFIXES) else registry.get_recipe(stem)
    config = None if name.endswith(".py") else registry.get_config(stem)
    if recipe is not None and config is not None:
        if destination.endswith(".py"):
            config = None
        elif destination.endswith(_CONFIG_SUFFIXES):
            recipe = None
        else:
            raise CLIError(
                f"'{name}' is both a recipe and a config: write '{stem}.py' for the recipe "
                f"or '{stem}.yaml' for the config"
            )
    found = recipe or config
    if found is None:
        candidates = [f"{r}.py" for r in registry.recipe_names()] + [
            f"{c}.yaml" for c in registry.config_names()
        ]
        matches = registry.close_matches(name, candidates) or registry.close_matches(
            stem, registry.recipe_names() + registry.config_names()
        )
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        raise CLIError(f"unknown recipe or config '{name}'.{hint} Run 'tune ls' to see what ships.")
    if not found.file_path.is_file():
        raise CLIError(
            f"'{name}' is missing from this installation ({found.file_path} does not exist); reinstall torchtune",
            code=1,
        )
    return found.file_path


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    source = _source(args.file, args.destination)
    dest = Path(args.destination)
    if dest.is_dir() or args.destination.endswith(("/", os.sep)):
        dest = dest / source.name
    elif not dest.suffix:
        dest = dest.with_suffix(source.suffix)
    if dest.exists() and not args.force:
        raise CLIError(f"{dest} already exists; pass --force to overwrite it", code=1)
    if dest.is_dir():
        raise CLIError(f"{dest} is a folder; give a file name or a folder to copy into", code=1)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    except OSError as e:
        raise CLIError(f"cannot copy to {dest}: {e.strerror or e}", code=1) from e
    print(f"Copied {source.name} to {dest}", file=sys.stdout)
    return 0
