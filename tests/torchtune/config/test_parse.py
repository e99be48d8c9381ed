# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest
from omegaconf import DictConfig, OmegaConf

from torchtune import _recipe_registry as registry
from torchtune import config

YAML = """
model: {_component_: torch.nn.Linear, in_features: 2, out_features: 3}
optimizer: {_component_: torch.optim.SGD, lr: 0.1}
epochs: 1
"""


@pytest.fixture
def recipe():
    calls = []

    @config.parse
    def recipe_main(cfg: DictConfig) -> int:
        """Tiny recipe."""
        calls.append(cfg)
        config.instantiate(cfg.model)
        return 0

    return recipe_main, calls


@pytest.fixture
def yaml_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    return path


def test_loads_config_and_applies_overrides(recipe, yaml_path):
    recipe_main, calls = recipe
    assert recipe_main(["--config", str(yaml_path), "epochs=3", "model.bias=false"]) == 0
    (cfg,) = calls
    assert cfg.epochs == 3 and cfg.model.bias is False


def test_reads_sys_argv_by_default(recipe, yaml_path, monkeypatch):
    recipe_main, calls = recipe
    monkeypatch.setattr("sys.argv", ["r.py", f"--config={yaml_path}", "optimizer.lr=1e-3"])
    recipe_main()
    assert calls[0].optimizer.lr == 1e-3


def test_typo_fails_before_recipe_body_runs(recipe, yaml_path, capsys):
    recipe_main, calls = recipe
    with pytest.raises(SystemExit) as info:
        recipe_main(["--config", str(yaml_path), "optimzer.lr=1e-3"])
    assert info.value.code == 1
    assert calls == []
    err = capsys.readouterr().err
    assert "optimzer" in err and "did you mean 'optimizer'?" in err
    assert "Traceback" not in err


def test_invalid_config_fails_before_recipe_body_runs(recipe, tmp_path, capsys):
    recipe_main, calls = recipe
    path = tmp_path / "bad.yaml"
    path.write_text(YAML.replace("lr: 0.1", "lr: 0.1, momentm: 0.9"))
    with pytest.raises(SystemExit):
        recipe_main(["--config", str(path)])
    assert calls == []
    assert (
        "optimizer.momentm: 'momentm' is not an argument of torch.optim.SGD; did you mean 'momentum'?"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --config"),
        (["--config", "x.yaml", "--lr", "1"], "unrecognized arguments: --lr"),
    ],
)
def test_command_line_errors_exit_2(recipe, argv, message, capsys):
    recipe_main, calls = recipe
    with pytest.raises(SystemExit) as info:
        recipe_main(argv)
    assert info.value.code == 2 and calls == []
    assert message in capsys.readouterr().err


def test_missing_file_exits_1(recipe, tmp_path, capsys):
    recipe_main, _ = recipe
    with pytest.raises(SystemExit) as info:
        recipe_main(["--config", str(tmp_path / "none.yaml")])
    assert info.value.code == 1
    assert "config file not found" in capsys.readouterr().err


def test_dictconfig_is_passed_straight_through(recipe):
    recipe_main, calls = recipe
    cfg = OmegaConf.create(YAML)
    recipe_main(cfg)
    assert calls == [cfg]


def test_packaged_config_name_resolves(recipe, tmp_path, monkeypatch):
    recipe_main, calls = recipe
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "full.yaml").write_text(YAML)
    monkeypatch.setattr(registry, "CONFIGS_DIR", tmp_path)
    monkeypatch.chdir(tmp_path / "tiny")
    recipe_main(["--config", "tiny/full", "epochs=2"])
    assert calls[0].epochs == 2
