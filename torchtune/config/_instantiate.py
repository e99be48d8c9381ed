# Copyright (c) torchtune contributors. BSD-3-Clause license.
import functools
from typing import Any, Dict, Optional, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from torchtune.config._component import (
    RESERVED_KEYS,
    ComponentImportError,
    check_argument,
    import_component,
    is_component,
    join_key,
    key_path,
    signature,
)
from torchtune.config._errors import ARGUMENT_ATTR, KEY_ATTR, ConfigProblem, InstantiationError


def instantiate(
    config: Optional[Union[DictConfig, Dict[str, Any]]], *args: Any, **kwargs: Any
) -> Any:
    """Build the object described by a ``_component_`` config node.

    The node's other keys become keyword arguments. Values that are themselves
    ``_component_`` nodes (also inside lists and dicts) are built first, with no extra
    arguments; mark one ``_partial_: true`` to receive a ``functools.partial`` instead,
    for a component that needs arguments only known later. ``args`` are passed
    positionally and ``kwargs`` override the node's keys, e.g.
    ``instantiate(cfg.optimizer, model.parameters())``. ``${...}`` interpolations are
    resolved against the whole config the node belongs to.

    Args:
        config: a node with a ``_component_`` key (dotted import path), or None.
        *args: positional arguments for the component.
        **kwargs: keyword arguments for the component; they win over the node's keys.

    Returns:
        The component's return value (None when ``config`` is None).

    Raises:
        InstantiationError: naming the key path, when ``_component_`` is missing or does not
            import, or when the arguments do not bind to the component's signature.
        ValueError, OSError: raised by the component itself, unchanged but marked with the key
            path of its node (``dataset``, or ``dataset.data_files`` for an error raised through
            ``config.for_argument``), for the message ``config.parse`` prints.
    """
    if config is None:
        return None
    if isinstance(config, dict):
        config = OmegaConf.create(config)
    if not isinstance(config, DictConfig):
        raise InstantiationError(
            [
                ConfigProblem(
                    "",
                    f"instantiate expects a config node with '_component_', got {type(config).__name__}",
                )
            ]
        )
    return _build_component(config, key_path(config), args, kwargs)


def _fail(key: str, message: str) -> InstantiationError:
    return InstantiationError([ConfigProblem(key or "<root>", message)])


def _build_component(
    node: DictConfig, path: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Any:
    if "_component_" not in node:
        keys = ", ".join(str(k) for k in node.keys())
        raise _fail(path, f"has no '_component_' key to instantiate (keys: {keys or 'none'})")
    comp_path = join_key(path, "_component_")
    try:
        component = node["_component_"]
        fn = import_component(component)
    except (ComponentImportError, OmegaConfBaseException) as e:
        raise _fail(comp_path, str(e)) from e
    partial = node.get("_partial_", False)
    if not isinstance(partial, bool):
        raise _fail(join_key(path, "_partial_"), f"must be true or false, got {partial!r}")

    names = [k for k in node.keys() if k not in RESERVED_KEYS]
    for name in names:
        if isinstance(name, str) and name.startswith("_") and name.endswith("_"):
            raise _fail(
                join_key(path, name), f"unknown reserved key; allowed: {', '.join(RESERVED_KEYS)}"
            )
        if name in kwargs:
            continue
        why = check_argument(fn, component, name)
        if why is not None:
            raise _fail(join_key(path, name), why)

    # Build nested components only once this node's own argument names are known to be good.
    call_kwargs = {
        name: _build_value(node, name, join_key(path, name)) for name in names if name not in kwargs
    }
    call_kwargs.update(kwargs)

    sig = signature(fn)
    if sig is not None:
        try:
            if partial:
                sig.bind_partial(*args, **call_kwargs)
            else:
                sig.bind(*args, **call_kwargs)
        except TypeError as e:
            raise _fail(path, f"arguments do not bind to {component}: {e}") from e
    if partial:
        return functools.partial(fn, *args, **call_kwargs)
    try:
        return fn(*args, **call_kwargs)
    except (ValueError, OSError) as e:
        _tag(e, path)
        raise


def _tag(error: BaseException, path: str) -> None:
    """Record on ``error`` the config key it came from: ``path``, or ``path.<argument>`` when
    the component marked the argument (``for_argument``). A component that instantiates another has tagged it already; the innermost key wins."""
    if getattr(error, KEY_ATTR, None) is not None:
        return
    argument = getattr(error, ARGUMENT_ATTR, None)
    setattr(error, KEY_ATTR, join_key(path, argument) if argument else path or None)


def _build_value(parent: Union[DictConfig, ListConfig], key: Any, path: str) -> Any:
    try:
        value = parent[key]
    except OmegaConfBaseException as e:
        raise _fail(path, f"cannot resolve value: {e}") from e
    if is_component(value):
        return _build_component(value, path, (), {})
    if isinstance(value, DictConfig):
        return {k: _build_value(value, k, join_key(path, k)) for k in value.keys()}
    if isinstance(value, ListConfig):
        return [_build_value(value, i, join_key(path, i, value)) for i in range(len(value))]
    return value
