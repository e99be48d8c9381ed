# Copyright (c) torchtune contributors. BSD-3-Clause license.
import argparse
import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

from omegaconf import DictConfig

from torchtune.config._errors import ConfigError
from torchtune.config._overrides import load_config
from torchtune.config._report import report
from torchtune.config._validate import validate


def resolve_config_path(config: str) -> Path:
    """A config given as a path (used when it exists) or a packaged config name."""
    path = Path(config)
    if path.is_file():
        return path
    from torchtune import _recipe_registry as registry

    packaged = registry.get_config(config)
    if packaged is not None and packaged.file_path.is_file():
        return packaged.file_path
    return path


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
    """Decorator for ``recipe_main(cfg: DictConfig)``: parse ``--config <yaml> [key=value ...]``.

    The wrapped function takes the command line (default ``sys.argv[1:]``), loads the
    YAML, applies the overrides, validates the result (every override key binds, every
    ``_component_`` imports, every argument name binds) and only then calls
    ``recipe_main(cfg)``, so a typo stops the run before any model is built. Config
    problems, and the bad inputs the recipe meets later (a missing file, a wrong column, a
    checkpoint of another size, an absent device: see ``config._report``), are printed as one
    paragraph to stderr, naming the config key, and exit with status 1; other errors keep their
    traceback, and ``TUNE_DEBUG=1`` keeps it for all. Passing a ``DictConfig`` instead calls
    ``recipe_main`` with it directly.
    """

    @functools.wraps(recipe_main)
    def wrapper(argv: Optional[Union[DictConfig, Sequence[str]]] = None) -> Any:
        if isinstance(argv, DictConfig):
            return recipe_main(argv)
        args: List[str] = list(sys.argv[1:] if argv is None else argv)
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else recipe_main.__name__
        parser = argparse.ArgumentParser(
            prog=prog,
            usage=f"{prog} --config <config> [key=value ...]",
            description=(recipe_main.__doc__ or "").strip() or None,
            allow_abbrev=False,
        )
        parser.add_argument(
            "--config", required=True, help="YAML config: a path or a packaged config name"
        )
        namespace, overrides = parser.parse_known_args(args)
        unknown = [a for a in overrides if a.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides are key=value)")
        code = getattr(inspect.unwrap(recipe_main), "__code__", None)
        recipe_file = code.co_filename if code is not None else None
        try:
            cfg = load_config(resolve_config_path(namespace.config), overrides)
            validate(cfg)
        except ConfigError as e:
            if report(e, prog):
                raise SystemExit(1) from None
            raise
        try:
            return recipe_main(cfg)
        except Exception as e:
            if report(e, prog, cfg, recipe_file):
                raise SystemExit(1) from None
            raise

    return wrapper
