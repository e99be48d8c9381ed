# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The fine-tuning recipes share code through the kit (torchtune/training, modules/peft), not
by copying it: no function body of more than a few statements appears in two recipe files."""

import ast
import importlib.util
from itertools import combinations
from pathlib import Path

import pytest

RECIPES = [
    "full_finetune_single_device",
    "full_finetune_distributed",
    "lora_finetune_single_device",
    "lora_finetune_distributed",
    "lora_dpo_single_device",
    "lora_dpo_distributed",
    "full_dpo_distributed",
]
# Up to this many statements (nested ones counted) a body may repeat: a property, a
# two-line cleanup, a kit call or two.
MAX_SHARED_STATEMENTS = 4


def _statements(body):
    return sum(isinstance(n, ast.stmt) for stmt in body for n in ast.walk(stmt))


def _normalised_bodies(source: str):
    """``{normalised body: qualified name}`` of every function in ``source``, docstrings
    dropped; ``ast.dump`` without positions, so formatting and comments do not count."""
    bodies = {}
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        if _statements(body) > MAX_SHARED_STATEMENTS:
            key = "\n".join(ast.dump(stmt, annotate_fields=False) for stmt in body)
            bodies[key] = node.name
    return bodies


def _recipe_bodies(name: str):
    path = Path(importlib.util.find_spec(f"torchtune.recipes.{name}").origin)
    return _normalised_bodies(path.read_text())


@pytest.mark.parametrize("a, b", list(combinations(RECIPES, 2)))
def test_no_function_body_is_repeated_between_recipes(a, b):
    bodies_a, bodies_b = _recipe_bodies(a), _recipe_bodies(b)
    shared = sorted(bodies_a[k] for k in set(bodies_a) & set(bodies_b))
    assert not shared, f"{a} and {b} repeat the bodies of {shared}: move them into the kit"


def test_the_check_catches_a_copied_body():
    # The same method in two classes, differently formatted and commented: caught.
    one = "class A:\n    def f(self, x):\n        y = x + 1\n        z = y * 2\n" + (
        "        if z:\n            z -= 1\n        return z\n"
    )
    two = one.replace("class A", "class B").replace("y * 2", "y*2  # why")
    assert set(_normalised_bodies(one)) == set(_normalised_bodies(two))
    short = "def g(x):\n    return x\n"
    assert not _normalised_bodies(short)  # one statement may repeat
    changed = two.replace("x + 1", "x + 2")
    assert not set(_normalised_bodies(one)) & set(_normalised_bodies(changed))
