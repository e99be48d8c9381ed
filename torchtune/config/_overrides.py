# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Loading a YAML config and applying command-line overrides to it.

Override forms:
    ``key.sub=value``   set a value; ``value`` is parsed as YAML (``1e-3`` is a float,
                        ``[q_proj,v_proj]`` a list, ``null`` None). ``key.sub`` must exist
                        in the config, or bind to the signature of the ``_component_``
                        node it sits under.
    ``+key.sub=value``  add a key that is neither (no check).
    ``~key.sub``        delete a key.
"""

import re
from pathlib import Path
from typing import Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from torchtune.config._component import (
    RESERVED_KEYS,
    ComponentImportError,
    check_argument,
    import_component,
)
from torchtune.config._errors import ConfigError, ConfigProblem, did_you_mean

_KEY = re.compile(r"^[A-Za-z_][\w\-]*(\.[A-Za-z_][\w\-]*)*$")


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML config file and apply ``overrides`` (see the module docstring).

    Raises:
        ConfigError: naming the file when it is missing, is not valid YAML or not a mapping,
            and naming each override key that binds to nothing (with the nearest valid key).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([ConfigProblem("", f"config file not found: {path}")])
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        raise ConfigError([ConfigProblem("", f"{path} is not valid YAML: {e}")]) from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(
            [ConfigProblem("", f"{path} must hold a mapping of keys at the top level")]
        )
    return apply_overrides(cfg, overrides, source=str(path))


def apply_overrides(
    cfg: DictConfig, overrides: Sequence[str], source: Optional[str] = None
) -> DictConfig:
    """Return ``cfg`` with ``overrides`` applied in order; each is checked against the
    config as it stands after the ones before it.

    Raises:
        ConfigError: listing every malformed override and every key that binds to nothing.
    """
    problems = []
    for raw in overrides:
        try:
            op, key, value = _split(raw)
        except ValueError as e:
            problems.append(ConfigProblem("", str(e)))
            continue
        if op == "=":
            problem = _check_key(cfg, key, raw)
            if problem is not None:
                problems.append(problem)
                continue
        if op == "~":
            problem = _delete(cfg, key, raw)
            if problem is not None:
                problems.append(problem)
            continue
        try:
            if _is_text_with_colon(value):
                # prompt="Reverse the words: a b" means that text, not {"Reverse the words": "a b"}
                cfg = OmegaConf.merge(cfg, OmegaConf.create({}))
                OmegaConf.update(cfg, key, value, force_add=True)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            problems.append(ConfigProblem(key, f"cannot apply override '{raw}': {e}"))
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _is_text_with_colon(value: str) -> bool:
    """True for a value YAML would read as a mapping although it has no braces (``a: b``):
    on the command line that is text with a colon in it. ``{a: b}`` stays a mapping."""
    if value.lstrip().startswith("{"):
        return False
    try:
        return isinstance(yaml.safe_load(value), dict)
    except yaml.YAMLError:
        return False


def _split(raw: str):
    """``(op, key, value)`` with op one of ``=``, ``+``, ``~``."""
    op = "="
    text = raw
    if text.startswith("~"):
        key = text[1:]
        if not _KEY.match(key):
            raise ValueError(f"bad override '{raw}': expected ~key.sub to delete a key")
        return "~", key, None
    if text.startswith("+"):
        op, text = "+", text[1:]
    key, sep, value = text.partition("=")
    if not sep or not _KEY.match(key):
        raise ValueError(f"bad override '{raw}': expected key.sub=value (or +key=value, ~key)")
    return op, key, value


def _check_key(cfg: DictConfig, key: str, raw: str) -> Optional[ConfigProblem]:
    """Why ``key`` binds to nothing in ``cfg``, or None when it is fine to set."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        parent = ".".join(parts[:i])
        prefix = parent + "." if parent else ""
        if isinstance(node, ListConfig):
            return ConfigProblem(
                parent, f"is a list; set the whole list instead: {parent}=[...] (override '{raw}')"
            )
        if part in node:
            if i == len(parts) - 1:
                return None
            try:
                node = node[part]
            except OmegaConfBaseException:
                return None  # an unresolvable interpolation is reported by validate
            if node is None:
                return None  # filling an empty section, e.g. lr_scheduler._component_=...
            if not isinstance(node, (DictConfig, ListConfig)):
                return ConfigProblem(
                    here,
                    f"is a value ({node!r}), not a section; set it with {here}=... (override '{raw}')",
                )
            continue
        keys = [str(k) for k in node.keys() if k not in RESERVED_KEYS]
        if "_component_" in node:
            try:
                component = node["_component_"]
                fn = import_component(component)
            except (ComponentImportError, OmegaConfBaseException):
                return None  # validate reports the broken _component_ itself
            why = check_argument(fn, component, part)
            if why is None:
                return None
            return ConfigProblem(here, f"{why} (override '{raw}')")
        where = f"under '{parent}'" if parent else "in the config"
        return ConfigProblem(
            here,
            f"unknown key {where}"
            + did_you_mean(part, keys, prefix=prefix)
            + f" (override '{raw}'; write +{key}=... to add a new key on purpose)",
        )
    return None


def _delete(cfg: DictConfig, key: str, raw: str) -> Optional[ConfigProblem]:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig) or last not in node:
        return ConfigProblem(key, f"cannot delete a key that does not exist (override '{raw}')")
    del node[last]
    return None
