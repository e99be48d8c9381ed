# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Importing ``_component_`` paths and checking argument names against signatures."""

import importlib
import inspect
from typing import Any, Callable, List, Optional

from omegaconf import DictConfig, ListConfig

from torchtune.config._errors import did_you_mean

# Keys with a meaning for `instantiate` itself; they are not passed to the component.
RESERVED_KEYS = ("_component_", "_partial_")


class ComponentImportError(ImportError):
    pass


def import_component(path: Any) -> Callable:
    """Import a dotted path such as ``torch.optim.AdamW`` and return the callable.

    Raises:
        ComponentImportError: if ``path`` is not a string, no module prefix of it imports,
            an attribute is missing (with the nearest name), the module itself fails to
            import, or the object is not callable.
    """
    if not isinstance(path, str) or not path.strip():
        raise ComponentImportError(f"_component_ must be a dotted import path, got {path!r}")
    parts = path.strip().split(".")
    if any(not p.isidentifier() for p in parts):
        raise ComponentImportError(f"'{path}' is not a dotted import path")
    module, n_mod = None, 0
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            module, n_mod = importlib.import_module(name), i
            break
        except ModuleNotFoundError as e:
            # Only "this prefix does not exist" means: try a shorter prefix. A module that
            # exists but imports something missing is a real failure to report.
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                continue
            raise ComponentImportError(f"importing '{name}' failed: {e}") from e
        except Exception as e:  # noqa: BLE001 - any failure inside the module is reported
            raise ComponentImportError(f"importing '{name}' failed: {type(e).__name__}: {e}") from e
    if module is None:
        raise ComponentImportError(f"cannot import '{path}': no module named '{parts[0]}'")
    obj: Any = module
    for j, attr in enumerate(parts[n_mod:]):
        owner = ".".join(parts[: n_mod + j])
        if not hasattr(obj, attr):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ComponentImportError(
                f"cannot import '{path}': '{owner}' has no attribute '{attr}'"
                + did_you_mean(attr, names, prefix=owner + ".")
            )
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ComponentImportError(f"'{path}' is not callable (it is a {type(obj).__name__})")
    return obj


def signature(fn: Callable) -> Optional[inspect.Signature]:
    """``inspect.signature(fn)``, or None for the few callables that have none."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def keyword_names(sig: inspect.Signature) -> List[str]:
    """Parameter names that can be passed by keyword."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def accepts_var_keyword(sig: inspect.Signature) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def check_argument(fn: Callable, component: str, name: str) -> Optional[str]:
    """Why ``name`` cannot be passed to ``fn`` by keyword, or None if it can."""
    sig = signature(fn)
    if sig is None or accepts_var_keyword(sig):
        return None
    param = sig.parameters.get(name)
    if param is not None and param.kind is inspect.Parameter.POSITIONAL_ONLY:
        return f"'{name}' is a positional-only argument of {component}; it cannot be set by name"
    if name in keyword_names(sig):
        return None
    names = keyword_names(sig)
    return (
        f"'{name}' is not an argument of {component}"
        + did_you_mean(name, names)
        + f" (its arguments: {', '.join(names) or 'none'})"
    )


def join_key(parent: str, key: Any, parent_node: Any = None) -> str:
    """Dotted key path; list items are written ``parent[i]``."""
    if isinstance(parent_node, ListConfig) or isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def key_path(node: Any) -> str:
    """Full dotted key path of an OmegaConf node inside its root config ("" for the root)."""
    parts: List[str] = []
    current = node
    while current is not None:
        parent = current._get_parent()
        if parent is None:
            break
        key = current._key()
        parts.append(f"[{key}]" if isinstance(parent, ListConfig) else f".{key}")
        current = parent
    return "".join(reversed(parts)).lstrip(".")


def is_component(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_component_" in node
