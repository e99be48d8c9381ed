# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest
from omegaconf import OmegaConf

from torchtune.config import ConfigError, apply_overrides, load_config

C = "tests.torchtune.config.components"

BASE = f"""
output_dir: /tmp/run
seed: 1
model:
  _component_: {C}.Pair
  first: 1
optimizer:
  _component_: torch.optim.AdamW
  lr: 2e-5
extra:
  _component_: {C}.takes_kwargs
  a: 1
lr_scheduler: null
dataset:
  files: [a.json]
  opts: {{split: train}}
"""


@pytest.fixture
def cfg():
    return OmegaConf.create(BASE)


def _problems(cfg, overrides):
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, overrides)
    return info.value.problems


def test_values_are_typed_by_yaml(cfg):
    out = apply_overrides(
        cfg,
        [
            "optimizer.lr=1e-3",
            "seed=7",
            "dataset.files=[x.json,y.json]",
            "model.first=null",
            "dataset.opts.split=true",
        ],
    )
    assert out.optimizer.lr == 1e-3 and isinstance(out.optimizer.lr, float)
    assert out.seed == 7
    assert list(out.dataset.files) == ["x.json", "y.json"]
    assert out.model.first is None
    assert out.dataset.opts.split is True


def test_text_with_a_colon_stays_text_and_braces_make_a_mapping(cfg):
    out = apply_overrides(
        cfg, ["output_dir=Reverse the words: a b", "+prompt=Q: 1 and 2", "extra.a={x: 1}"]
    )
    assert out.output_dir == "Reverse the words: a b"
    assert out.prompt == "Q: 1 and 2"
    assert OmegaConf.to_container(out.extra.a) == {"x": 1}
    assert apply_overrides(cfg, ['output_dir="quoted: too"']).output_dir == "quoted: too"


def test_key_binding_to_component_signature_is_accepted(cfg):
    out = apply_overrides(
        cfg, ["model.scale=0.5", "optimizer.weight_decay=0.1", "extra.anything=3"]
    )
    assert out.model.scale == 0.5
    assert out.optimizer.weight_decay == 0.1
    assert out.extra.anything == 3  # takes **kwargs


def test_top_level_typo_names_key_and_suggests(cfg):
    (problem,) = _problems(cfg, ["optimzer.lr=1e-3"])
    assert problem.key == "optimzer"
    assert "did you mean 'optimizer'?" in problem.message
    assert "optimzer.lr=1e-3" in problem.message


def test_argument_typo_under_component_suggests_argument(cfg):
    (problem,) = _problems(cfg, ["optimizer.lrr=1e-3"])
    assert problem.key == "optimizer.lrr"
    assert "not an argument of torch.optim.AdamW; did you mean 'lr'?" in problem.message


def test_typo_under_plain_section_suggests_full_path(cfg):
    (problem,) = _problems(cfg, ["dataset.opts.splt=test"])
    assert problem.key == "dataset.opts.splt"
    assert "did you mean 'dataset.opts.split'?" in problem.message


def test_every_problem_is_reported_and_nothing_half_applied(cfg):
    problems = _problems(
        cfg, ["optimzer.lr=1", "seed.x=1", "dataset.files.x=a", "noequals", "~missing"]
    )
    keys = [p.key for p in problems]
    assert keys == ["optimzer", "seed", "dataset.files", "", "missing"]
    assert "is a value (1), not a section" in problems[1].message
    assert "is a list" in problems[2].message
    assert "bad override 'noequals'" in problems[3].message
    assert "does not exist" in problems[4].message
    assert "optimzer" not in cfg


def test_plus_adds_and_tilde_deletes(cfg):
    out = apply_overrides(cfg, ["+compile=true", "~dataset.opts", "+model.new_section.x=1"])
    assert out.compile is True
    assert "opts" not in out.dataset
    assert out.model.new_section.x == 1


def test_overrides_apply_in_order_against_the_current_config(cfg):
    # momentum is not an AdamW argument, but it is one of SGD's once _component_ changes.
    out = apply_overrides(cfg, ["optimizer._component_=torch.optim.SGD", "optimizer.momentum=0.9"])
    assert out.optimizer._component_ == "torch.optim.SGD" and out.optimizer.momentum == 0.9
    (problem,) = _problems(cfg, ["optimizer.momentum=0.9"])
    assert problem.key == "optimizer.momentum"


def test_filling_an_empty_section(cfg):
    out = apply_overrides(
        cfg,
        ["lr_scheduler._component_=torch.optim.lr_scheduler.StepLR", "lr_scheduler.step_size=2"],
    )
    assert out.lr_scheduler.step_size == 2


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config(lst)


def test_load_config_applies_overrides_and_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    assert load_config(path, ["seed=3"]).seed == 3
    with pytest.raises(ConfigError, match=r"in .*c\.yaml: optimzer: unknown key"):
        load_config(path, ["optimzer.lr=1e-3"])
