# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune validate``: check a config without running anything."""

import argparse
import sys
from typing import List

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


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    path = resolve_config(args.config)
    try:
        cfg = tt_config.load_config(path, args.overrides)
        problems = tt_config.find_problems(cfg)
    except tt_config.ConfigError as e:
        problems = e.problems
    if problems:
        print(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{path}: config is valid")
    return 0
