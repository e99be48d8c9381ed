# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""A non-editable install ships the recipes and configs (package-data in pyproject.toml)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_wheel_contains_recipes_and_nested_configs(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("pyproject.toml needs setuptools>=77 to build without isolation")
    # Build from a copy with probe files, so the globs are checked at every nesting depth
    # whatever recipes exist today.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "torchtune", src / "torchtune", ignore=shutil.ignore_patterns("__pycache__")
    )
    recipes = src / "torchtune" / "recipes"
    (recipes / "zz_probe_recipe.py").write_text("print('probe')\n")
    (recipes / "configs" / "zz_probe").mkdir(parents=True)
    (recipes / "configs" / "zz_probe" / "deep.yaml").write_text("a: 1\n")
    (recipes / "configs" / "zz_probe_top.yaml").write_text("a: 1\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("torchtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "torchtune/recipes/zz_probe_recipe.py",
        "torchtune/recipes/configs/zz_probe/deep.yaml",
        "torchtune/recipes/configs/zz_probe_top.yaml",
        "torchtune/_cli/tune.py",
        "torchtune/_recipe_registry.py",
    }
    shipped = {
        p.relative_to(src).as_posix() for p in recipes.rglob("*") if p.suffix in (".py", ".yaml")
    }
    assert sorted((expected | shipped) - names) == []
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tune = torchtune._cli.tune:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
