# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune [torchrun options] <recipe> --config <config> [key=value ...]``.

torchrun's own argument parser splits the command line: what comes before the recipe
is a torchrun option, what comes after belongs to the recipe. With no torchrun option
the recipe runs in this process; with any, it launches through ``torch.distributed.run``.
"""

import argparse
import logging
import os
import runpy
import sys
import tempfile
from pathlib import Path
from typing import Any, List, Optional

USAGE = "tune [options] <recipe> [recipe_args]"


def build_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "tune"
    parser.usage = USAGE
    parser.description = "Run a recipe; any option below launches it through torch.distributed.run."
    for action in parser._actions:  # name the positionals as our usage line does
        if action.dest == "training_script":
            action.metavar = "recipe"
            action.help = "packaged recipe name (see 'tune ls') or path to a recipe .py"
        elif action.dest == "training_script_args":
            action.metavar = "recipe_args"
    return parser


def _resolve_config_arg(recipe_args: List[str]) -> List[str]:
    from torchtune._cli._names import resolve_config

    out = list(recipe_args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(resolve_config(out[i + 1]))
            break
        if arg.startswith("--config="):
            out[i] = "--config=" + str(resolve_config(arg[len("--config=") :]))
            break
    return out


def exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_in_process(recipe: Path, recipe_args: List[str]) -> int:
    """Run ``recipe`` as ``__main__`` here, as ``python recipe.py recipe_args`` would."""
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(recipe), *recipe_args]
    sys.path.insert(0, str(recipe.resolve().parent))
    try:
        runpy.run_path(str(recipe), run_name="__main__")
    except SystemExit as e:
        return exit_code(e)
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path
    return 0


class _HeldLogs(logging.Filter):
    """Holds torchrun's own reports of a worker failure until ``tune`` knows whether the
    worker failed on a bad input (then its paragraph says it all) or crashed (then they are
    shown, with the traceback dump)."""

    LOGGERS = (
        "torch.distributed.elastic.multiprocessing.api",
        "torch.distributed.elastic.agent.server.api",
    )

    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def __enter__(self) -> "_HeldLogs":
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)

    def release(self) -> None:
        self.__exit__()
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.records = []


def _worker_message(error: Any, error_dir: Path) -> Optional[str]:
    """The paragraph a failing worker wrote (``config.parse`` on a bad input): the first
    failing rank's, else the lowest rank's; None when no worker wrote one (a crash)."""
    written = {int(p.stem.split("_", 1)[1]): p for p in error_dir.glob("rank_*.txt")}
    if not written:
        return None
    first_rank, _ = error.get_first_failure()
    return written.get(first_rank, written[min(written)]).read_text().rstrip()


def launch_distributed(args: argparse.Namespace) -> int:
    """Run the workers through torchrun. A bad input is reported once, by the first failing
    rank's paragraph, rather than by every rank and torchrun's failure dump."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    from torchtune.config._report import ERROR_DIR_ENV

    old = os.environ.get(ERROR_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="tune_errors_") as error_dir, _HeldLogs() as held:
        os.environ[ERROR_DIR_ENV] = error_dir  # the workers inherit it
        try:
            run(args)
        except ChildFailedError as e:
            message = _worker_message(e, Path(error_dir))
            if message is not None:
                print(message, file=sys.stderr)
                return 1
            held.release()
            print(f"tune: error: a worker of {args.training_script} failed\n{e}", file=sys.stderr)
            return 1
        finally:
            if old is None:
                os.environ.pop(ERROR_DIR_ENV, None)
            else:
                os.environ[ERROR_DIR_ENV] = old
        held.release()
    return 0


def _check_config(recipe_args: List[str]) -> int:
    """Validate ``--config`` and its overrides once here rather than in every worker."""
    from torchtune import config as tt_config

    config, overrides = None, []
    i = 0
    while i < len(recipe_args):
        arg = recipe_args[i]
        if arg == "--config" and i + 1 < len(recipe_args):
            config, i = recipe_args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config = arg[len("--config=") :]
        elif not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    if config is None:
        return 0  # the recipe's own parser reports the missing --config
    try:
        tt_config.validate(tt_config.load_config(config, overrides))
    except tt_config.ConfigError as e:
        print(f"tune: error: {e}", file=sys.stderr)
        return 1
    return 0


def _check_distributed_support(recipe: Path, args: argparse.Namespace) -> None:
    """Refuse to launch several workers of a packaged single-device recipe."""
    from torchtune import _recipe_registry as registry
    from torchtune._cli._names import CLIError

    packaged = next((r for r in registry.RECIPES if r.file_path == recipe), None)
    if packaged is None or packaged.supports_distributed:
        return
    if str(args.nproc_per_node) == "1" and str(args.nnodes) in ("1", "1:1"):
        return
    multi = [r.name for r in registry.RECIPES if r.supports_distributed]
    raise CLIError(
        f"recipe '{packaged.name}' runs on a single device; it cannot be launched with "
        f"--nnodes {args.nnodes} --nproc_per_node {args.nproc_per_node}. For several devices "
        f"use {' or '.join(multi)}."
    )


def main(argv: List[str]) -> int:
    from torchtune._cli._names import resolve_recipe

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.training_script == "run" and args.training_script_args:
        # `tune --nproc_per_node 2 run <recipe> ...`
        args.training_script, *args.training_script_args = args.training_script_args
    recipe_index = len(argv) - 1 - len(args.training_script_args)
    has_torchrun_options = any(a.startswith("-") for a in argv[:recipe_index])
    recipe = resolve_recipe(args.training_script)
    recipe_args = _resolve_config_arg(args.training_script_args)
    if not has_torchrun_options:
        return run_in_process(recipe, recipe_args)
    _check_distributed_support(recipe, args)
    if _check_config(recipe_args):
        return 1
    args.training_script = os.fspath(recipe)
    args.training_script_args = recipe_args
    return launch_distributed(args)
