# Copyright (c) torchtune contributors. BSD-3-Clause license.
import textwrap
from pathlib import Path

import pytest

from torchtune import _recipe_registry as registry

# A trivial recipe: records what it was given so tests can check the whole path from
# the command line to recipe_main.
RECIPE = textwrap.dedent(
    '''
    import json
    import os
    import sys

    from torchtune import config


    @config.parse
    def recipe_main(cfg):
        """Trivial recipe for the CLI tests."""
        layer = config.instantiate(cfg.model)
        record = {
            "argv0": sys.argv[0],
            "out_features": layer.out_features,
            "lr": cfg.optimizer.lr,
            "epochs": cfg.epochs,
            "rank": int(os.environ.get("RANK", -1)),
            "world_size": int(os.environ.get("WORLD_SIZE", -1)),
        }
        name = "record_rank%d.json" % record["rank"] if record["rank"] >= 0 else "record.json"
        with open(os.path.join(cfg.output_dir, name), "w") as f:
            json.dump(record, f)
        return cfg.get("exit_code", 0)


    if __name__ == "__main__":
        sys.exit(recipe_main())
    '''
)

CONFIG = textwrap.dedent(
    """
    output_dir: {output_dir}
    epochs: 1
    model:
      _component_: torch.nn.Linear
      in_features: 2
      out_features: 3
    optimizer:
      _component_: torch.optim.SGD
      lr: 0.1
    """
)


@pytest.fixture
def recipe_files(tmp_path):
    """A recipe .py and a config .yaml (by path) in tmp_path; the recipe writes to tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir()
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(RECIPE)
    config = tmp_path / "my_config.yaml"
    config.write_text(CONFIG.format(output_dir=out))
    return recipe, config, out


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """Point the registry at a throwaway recipes folder holding every registered file."""
    recipes = tmp_path / "pkg" / "recipes"
    configs = recipes / "configs"
    out = tmp_path / "pkg_out"
    out.mkdir()
    for recipe in registry.RECIPES:
        path = recipes / f"{recipe.name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(RECIPE)
        for config in recipe.configs:
            if config.alias_of:  # reads its target's file
                continue
            path = configs / f"{config.name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {config.name}\n" + CONFIG.format(output_dir=out))
    monkeypatch.setattr(registry, "RECIPES_DIR", recipes)
    monkeypatch.setattr(registry, "CONFIGS_DIR", configs)
    return recipes, configs, out


def read_record(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
