# Copyright (c) torchtune contributors. BSD-3-Clause license.
from typing import Any, List, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from torchtune.config._component import (
    RESERVED_KEYS,
    ComponentImportError,
    check_argument,
    import_component,
    join_key,
)
from torchtune.config._errors import ConfigError, ConfigProblem


def find_problems(cfg: DictConfig) -> List[ConfigProblem]:
    """Every problem in ``cfg`` found without building anything.

    Checks that each ``${...}`` interpolation resolves, that each ``_component_`` imports,
    and that each key under a ``_component_`` node is an argument of that callable (any
    key binds when it takes ``**kwargs``). Required arguments are not checked: recipes
    pass some at call time (an optimizer's parameters, a dataset's tokenizer).
    """
    problems: List[ConfigProblem] = []
    _walk(cfg, "", problems)
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every problem ``find_problems`` finds in ``cfg``.

    Raises:
        ConfigError: with ``.problems``, each naming its key path.
    """
    problems = find_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _walk(node: Union[DictConfig, ListConfig], path: str, problems: List[ConfigProblem]) -> None:
    if isinstance(node, DictConfig) and "_component_" in node:
        _check_component(node, path, problems)
    keys: List[Any] = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for key in keys:
        child_path = join_key(path, key, node)
        try:
            value = node[key]
        except OmegaConfBaseException as e:
            problems.append(ConfigProblem(child_path, f"cannot resolve value: {e}"))
            continue
        # An interpolation pointing at a section is checked where that section lives.
        if isinstance(value, (DictConfig, ListConfig)) and not OmegaConf.is_interpolation(
            node, key
        ):
            _walk(value, child_path, problems)


def _check_component(node: DictConfig, path: str, problems: List[ConfigProblem]) -> None:
    try:
        component = node["_component_"]
        fn = import_component(component)
    except (ComponentImportError, OmegaConfBaseException) as e:
        problems.append(ConfigProblem(join_key(path, "_component_"), str(e)))
        return
    for key in node.keys():
        key_name = join_key(path, key)
        if key in RESERVED_KEYS:
            if key == "_partial_" and not isinstance(node.get(key), bool):
                problems.append(
                    ConfigProblem(key_name, f"must be true or false, got {node.get(key)!r}")
                )
            continue
        if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
            problems.append(
                ConfigProblem(
                    key_name, f"unknown reserved key; allowed: {', '.join(RESERVED_KEYS)}"
                )
            )
            continue
        why = check_argument(fn, component, str(key))
        if why is not None:
            problems.append(ConfigProblem(key_name, why))
