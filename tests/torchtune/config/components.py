# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Small callables that the config tests refer to by dotted path."""

from typing import Any, Dict, List, Optional


class Pair:
    def __init__(self, first: Any, second: Any = None, *, scale: float = 1.0):
        self.first = first
        self.second = second
        self.scale = scale


def make_list(items: List[Any], tag: Optional[str] = None) -> Dict[str, Any]:
    return {"items": items, "tag": tag}


def takes_kwargs(a: int, **extra: Any) -> Dict[str, Any]:
    return {"a": a, **extra}


def positional_only(a: int, /, b: int = 0) -> int:
    return a + b


NOT_CALLABLE = 3
