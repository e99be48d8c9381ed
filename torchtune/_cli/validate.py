# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune validate``: check a config without running anything."""

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

from omegaconf import DictConfig

from torchtune import config as tt_config
from torchtune._cli._names import resolve_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune validate",
        usage="tune validate --config <config> [key=value ...]",
        description=(
            "Check a config without building anything: every ${...} interpolation resolves, "
            "every _component_ imports, every argument name binds to its component, and "
            "every key=value override names a real key. Prints each problem with its key "
            "path; exit status 1 if there is any."
        ),
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", required=True, help="a packaged config name or a path to a .yaml"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides to check along with the config"
    )
    return parser


def check(path: Path, overrides: List[str]) -> Tuple[Optional[DictConfig], List[Any]]:
    """Load ``path`` with ``overrides`` and find its problems: ``(cfg, [])`` when it is valid,
    ``(None, problems)`` otherwise. ``tune plan`` checks its config with this too."""
    try:
        cfg = tt_config.load_config(path, overrides)
        problems = tt_config.find_problems(cfg)
    except tt_config.ConfigError as e:
        return None, e.problems
    return (None if problems else cfg), problems


def print_problems(path: Path, problems: List[Any]) -> None:
    print(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    path = resolve_config(args.config)
    _, problems = check(path, args.overrides)
    if problems:
        print_problems(path, problems)
        return 1
    print(f"{path}: config is valid")
    return 0
