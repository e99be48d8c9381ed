# Copyright (c) torchtune contributors. BSD-3-Clause license.
import functools
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tests.torchtune.config.components import Pair
from torchtune.config import InstantiationError, instantiate

C = "tests.torchtune.config.components"


def _cfg(yaml_text: str):
    return OmegaConf.create(yaml_text)


def test_builds_module_same_as_direct_call():
    cfg = _cfg(
        "model: {_component_: torch.nn.Linear, in_features: 5, out_features: 3, bias: false}"
    )
    torch.manual_seed(0)
    built = instantiate(cfg.model)
    torch.manual_seed(0)
    direct = torch.nn.Linear(5, 3, bias=False)
    assert built.bias is None
    torch.testing.assert_close(built.weight, direct.weight, rtol=0, atol=0)


def test_positional_args_and_call_time_kwargs_override():
    cfg = _cfg("optimizer: {_component_: torch.optim.SGD, lr: 0.5, momentum: 0.9}")
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = instantiate(cfg.optimizer, params, lr=0.25)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.25
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["params"][0] is params[0]


def test_nested_components_in_kwargs_lists_and_dicts():
    cfg = _cfg(
        f"""
        root: /data
        obj:
          _component_: {C}.Pair
          first:
            _component_: {C}.make_list
            items:
              - {{_component_: torch.nn.Identity}}
              - plain
              - {{inner: {{_component_: {C}.takes_kwargs, a: 1, b: 2}}}}
          second: ${{root}}/file.json
          scale: 2.5
        """
    )
    obj = instantiate(cfg.obj)
    assert isinstance(obj, Pair)
    assert obj.scale == 2.5
    assert obj.second == "/data/file.json"
    items = obj.first["items"]
    assert isinstance(items[0], torch.nn.Identity)
    assert items[1] == "plain"
    assert items[2] == {"inner": {"a": 1, "b": 2}}
    assert type(items[2]) is dict  # plain containers, not DictConfig


def test_partial_returns_functools_partial():
    cfg = _cfg(f"p: {{_component_: {C}.Pair, _partial_: true, scale: 3.0}}")
    made = instantiate(cfg.p)
    assert isinstance(made, functools.partial)
    pair = made("x")
    assert (pair.first, pair.second, pair.scale) == ("x", None, 3.0)


def test_none_and_plain_dict():
    assert instantiate(None) is None
    pair = instantiate({"_component_": f"{C}.Pair", "first": 1})
    assert pair.first == 1


def test_missing_component_key_names_key_path():
    cfg = _cfg("a: {b: {lr: 1}}")
    with pytest.raises(InstantiationError, match=r"a\.b: has no '_component_'"):
        instantiate(cfg.a.b)
    with pytest.raises(InstantiationError, match="expects a config node"):
        instantiate(3)


@pytest.mark.parametrize(
    "component, expected",
    [
        (
            "torch.nn.Linearr",
            r"model\._component_: cannot import 'torch\.nn\.Linearr'.*did you mean 'torch\.nn\.Linear'",
        ),
        (
            "no_such_pkg_xyz.Thing",
            r"model\._component_: cannot import 'no_such_pkg_xyz\.Thing': no module named",
        ),
        (f"{C}.NOT_CALLABLE", r"model\._component_: .*is not callable"),
        ("not a path", r"model\._component_: 'not a path' is not a dotted import path"),
    ],
)
def test_component_that_does_not_import_names_key_path(component, expected):
    cfg = OmegaConf.create({"model": {"_component_": component}})
    with pytest.raises(InstantiationError, match=expected):
        instantiate(cfg.model)


def test_module_failing_inside_its_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_mod_for_tt.py").write_text("import a_dependency_that_is_missing_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = OmegaConf.create({"x": {"_component_": "broken_mod_for_tt.Thing"}})
    with pytest.raises(
        InstantiationError,
        match=r"x\._component_: importing 'broken_mod_for_tt.*' failed.*a_dependency_that_is_missing_xyz",
    ):
        instantiate(cfg.x)
    sys.modules.pop("broken_mod_for_tt", None)


def test_unknown_argument_names_key_and_nearest():
    cfg = _cfg("optimizer: {_component_: torch.optim.SGD, lrr: 0.1}")
    with pytest.raises(
        InstantiationError,
        match=r"optimizer\.lrr: 'lrr' is not an argument of torch\.optim\.SGD; did you mean 'lr'",
    ):
        instantiate(cfg.optimizer, [torch.nn.Parameter(torch.ones(1))])


def test_missing_required_argument_names_key_path():
    cfg = _cfg("optimizer: {_component_: torch.optim.SGD, lr: 0.1}")
    with pytest.raises(
        InstantiationError,
        match=r"optimizer: arguments do not bind to torch\.optim\.SGD: missing a required argument: 'params'",
    ):
        instantiate(cfg.optimizer)


def test_nested_error_names_full_path_and_outer_is_not_built():
    cfg = _cfg(
        f"""
        outer:
          _component_: {C}.make_list
          items:
            - {{_component_: {C}.takes_kwargs, a: 1}}
            - {{_component_: {C}.Pair, frist: 1}}
        """
    )
    with pytest.raises(
        InstantiationError,
        match=r"outer\.items\[1\]\.frist: 'frist' is not an argument.*did you mean 'first'",
    ):
        instantiate(cfg.outer)


def test_bad_interpolation_and_bad_partial_and_reserved_key():
    cfg = _cfg(f"p: {{_component_: {C}.Pair, first: '${{nope}}'}}")
    with pytest.raises(InstantiationError, match=r"p\.first: cannot resolve value"):
        instantiate(cfg.p)
    cfg = _cfg(f"p: {{_component_: {C}.Pair, _partial_: 'yes'}}")
    with pytest.raises(InstantiationError, match=r"p\._partial_: must be true or false"):
        instantiate(cfg.p)
    cfg = _cfg(f"p: {{_component_: {C}.Pair, _target_: x, first: 1}}")
    with pytest.raises(InstantiationError, match=r"p\._target_: unknown reserved key"):
        instantiate(cfg.p)


def test_positional_only_parameter_cannot_be_named():
    cfg = _cfg(f"f: {{_component_: {C}.positional_only, a: 1}}")
    with pytest.raises(InstantiationError, match=r"f\.a: 'a' is a positional-only argument"):
        instantiate(cfg.f)
    assert instantiate(_cfg(f"f: {{_component_: {C}.positional_only, b: 2}}").f, 1) == 3
