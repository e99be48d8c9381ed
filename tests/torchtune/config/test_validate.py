# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest
from omegaconf import OmegaConf

from torchtune.config import ConfigError, find_problems, validate

C = "tests.torchtune.config.components"


def test_valid_config_has_no_problems():
    cfg = OmegaConf.create(
        f"""
        out: /tmp
        model: {{_component_: torch.nn.Linear, in_features: 2, out_features: 3}}
        opt: {{_component_: torch.optim.SGD, lr: 0.1, _partial_: true}}
        wrapped:
          _component_: {C}.Pair
          first: {{_component_: {C}.takes_kwargs, a: 1, zzz: 2}}
          second: ${{out}}/x
        """
    )
    assert find_problems(cfg) == []
    validate(cfg)  # does not raise


def test_every_problem_listed_with_key_path():
    cfg = OmegaConf.create(
        f"""
        model: {{_component_: torch.nn.Linearr, in_features: 2}}
        opt: {{_component_: torch.optim.SGD, lrr: 0.1}}
        path: ${{missing_key}}/x
        nested:
          items:
            - {{_component_: {C}.Pair, frist: 1, _partial_: 1}}
            - {{_component_: {C}.positional_only, a: 1, _oops_: 2}}
        """
    )
    problems = find_problems(cfg)
    by_key = {p.key: p.message for p in problems}
    assert list(by_key) == [
        "model._component_",
        "opt.lrr",
        "path",
        "nested.items[0].frist",
        "nested.items[0]._partial_",
        "nested.items[1].a",
        "nested.items[1]._oops_",
    ]
    assert "did you mean 'torch.nn.Linear'" in by_key["model._component_"]
    assert "did you mean 'lr'" in by_key["opt.lrr"]
    assert "cannot resolve value" in by_key["path"]
    assert "did you mean 'first'" in by_key["nested.items[0].frist"]
    assert "positional-only" in by_key["nested.items[1].a"]
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.problems == problems
    assert str(info.value).startswith("7 config errors")
    assert "  opt.lrr: 'lrr' is not an argument" in str(info.value)


def test_pkg_interpolation_points_into_the_installed_package():
    from pathlib import Path

    import torchtune
    from torchtune.config import instantiate

    cfg = OmegaConf.create(
        {
            "tok": "${pkg:assets/tiny/tokenizer.model}",
            "obj": {
                "_component_": "tests.torchtune.config.components.Pair",
                "first": "${pkg:recipes/configs}",
            },
            "bad": "${pkg:../outside}",
        }
    )
    root = Path(torchtune.__file__).resolve().parent
    assert cfg.tok == str(root / "assets" / "tiny" / "tokenizer.model")
    assert instantiate(cfg.obj).first == str(root / "recipes" / "configs")
    (problem,) = find_problems(cfg)
    assert problem.key == "bad" and "relative to the torchtune package" in problem.message
