# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Which errors end a run as one paragraph naming the config key (bad inputs) and which keep
their traceback (bugs); the key ``instantiate`` records; the torchrun error folder."""

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from torchtune import config
from torchtune.config._report import ERROR_DIR_ENV, report, user_message

HERE = "tests.torchtune.config.test_report"


def reads_file(path: str, mode: str = "r"):
    raise config.for_argument(FileNotFoundError(f"no file at {path}; give an existing one"), "path")


def checks_value(n: int):
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def unpacks(items):
    a, b = items  # a bug when items has three things: an implicit ValueError
    return a + b


def has_type_bug(n: int):
    return n + "1"


def _cfg(**nodes) -> DictConfig:
    return OmegaConf.create(nodes)


def _raised(fn, *args, **kwargs) -> BaseException:
    with pytest.raises(BaseException) as info:
        fn(*args, **kwargs)
    return info.value


def test_component_error_names_the_argument_and_its_value():
    cfg = _cfg(data={"_component_": f"{HERE}.reads_file", "path": "/nope.json", "mode": "r"})
    err = _raised(config.instantiate, cfg.data)
    assert isinstance(err, FileNotFoundError)  # the type is kept for callers that catch it
    assert user_message(err, cfg) == (
        "data.path=/nope.json: no file at /nope.json; give an existing one"
    )


def test_component_value_error_names_the_node():
    cfg = _cfg(outer={"inner": {"_component_": f"{HERE}.checks_value", "n": -2}})
    err = _raised(config.instantiate, cfg.outer.inner)
    assert user_message(err, cfg) == "outer.inner: n must be >= 0, got -2"


def test_nested_component_keeps_the_innermost_key():
    cfg = _cfg(
        pair={
            "_component_": "tests.torchtune.config.components.Pair",
            "first": {"_component_": f"{HERE}.checks_value", "n": -1},
        }
    )
    err = _raised(config.instantiate, cfg.pair)
    assert user_message(err, cfg).startswith("pair.first: n must be >= 0")


@pytest.mark.parametrize(
    "node",
    [
        {"_component_": f"{HERE}.unpacks", "items": [1, 2, 3]},  # implicit ValueError
        {"_component_": f"{HERE}.has_type_bug", "n": 1},  # TypeError
    ],
)
def test_bugs_in_components_are_not_user_errors(node):
    cfg = _cfg(x=node)
    err = _raised(config.instantiate, cfg.x)
    assert user_message(err, cfg) is None


def test_value_error_outside_torchtune_and_components_is_a_bug():
    err = _raised(checks_value, -1)  # raised on purpose, but by code outside torchtune
    assert user_message(err) is None
    assert user_message(err, recipe_file=__file__) == "n must be >= 0, got -1"


def test_file_errors_anywhere_are_user_errors(tmp_path):
    err = _raised(open, tmp_path / "missing.txt")
    assert "No such file or directory" in user_message(err)
    assert user_message(_raised(open, tmp_path)) is not None  # IsADirectoryError


def test_state_dict_shape_mismatch_names_model_and_checkpoint_keys():
    cfg = _cfg(
        model={"_component_": "torchtune.models.llama2.llama2"},
        checkpointer={"checkpoint_dir": "/models/Llama-2-13b-hf"},
    )
    small, big = torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)
    err = _raised(small.load_state_dict, big.state_dict())
    text = user_message(err, cfg)
    assert text.startswith(
        "the checkpoint in checkpointer.checkpoint_dir=/models/Llama-2-13b-hf does not fit the "
        "model built by model._component_=torchtune.models.llama2.llama2: 'weight' has shape "
        "[4, 2] in the checkpoint but [3, 2] in the model (and 1 more parameters differ)"
    )
    assert "another model size" in text
    err = _raised(small.load_state_dict, {"weight": small.weight})
    assert "lacks 1 of its parameters (first: bias)" in user_message(err, cfg)
    assert user_message(RuntimeError("CUDA error: device-side assert triggered"), cfg) is None


def test_report_prints_one_line_and_debug_keeps_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("TUNE_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = _cfg(x={"_component_": f"{HERE}.checks_value", "n": -1})
    err = _raised(config.instantiate, cfg.x)
    assert report(err, "prog", cfg)
    err_text = capsys.readouterr().err
    assert err_text.startswith("prog: error: x: n must be >= 0, got -1 (TUNE_DEBUG=1")
    assert err_text.count("\n") == 1
    monkeypatch.setenv("TUNE_DEBUG", "1")
    assert not report(err, "prog", cfg)


def test_parse_exits_1_on_a_bad_input_and_reraises_a_bug(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TUNE_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(f"x: {{_component_: {HERE}.checks_value, n: 1}}\n")

    @config.parse
    def recipe_main(cfg):
        return config.instantiate(cfg.x)

    assert recipe_main(["--config", str(path)]) == 1
    with pytest.raises(SystemExit) as info:
        recipe_main(["--config", str(path), "x.n=-5"])
    assert info.value.code == 1
    err_text = capsys.readouterr().err
    assert "error: x: n must be >= 0, got -5" in err_text and "Traceback" not in err_text
    with pytest.raises(TypeError):
        recipe_main(["--config", str(path), f"x._component_={HERE}.has_type_bug"])
    monkeypatch.setenv("TUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="n must be >= 0"):
        recipe_main(["--config", str(path), "x.n=-5"])


def test_torchrun_worker_writes_its_paragraph_for_tune(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TUNE_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(ERROR_DIR_ENV, str(tmp_path))
    assert report(config.ConfigError([config.ConfigProblem("a.b", "bad")]), "prog")
    assert capsys.readouterr().err == ""
    assert (tmp_path / "rank_1.txt").read_text() == "prog: error: config error: a.b: bad\n"
