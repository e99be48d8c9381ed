# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""YAML configs: ``_component_`` instantiation, command-line overrides, validation."""

from torchtune.config._errors import ConfigError, ConfigProblem, InstantiationError, for_argument
from torchtune.config._instantiate import instantiate
from torchtune.config._overrides import apply_overrides, load_config
from torchtune.config._parse import parse, resolve_config_path
from torchtune.config._resolvers import package_path, register_resolvers
from torchtune.config._validate import find_problems, validate

register_resolvers()

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "InstantiationError",
    "for_argument",
    "instantiate",
    "apply_overrides",
    "load_config",
    "parse",
    "resolve_config_path",
    "find_problems",
    "validate",
    "package_path",
]
