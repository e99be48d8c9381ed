# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The ``tune`` entry point: usage, help, and running recipes in-process and via torchrun."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.torchtune._cli.conftest import read_record
from torchtune._cli.tune import main

TUNE = str(Path(sys.executable).parent / "tune")


def test_tune_alone_prints_usage_and_exits_2_subprocess():
    proc = subprocess.run([TUNE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: tune [options] <recipe> [recipe_args]\n")
    assert "tune: error: the following arguments are required: recipe" in proc.stderr


@pytest.mark.parametrize("argv", [[], ["run"]])
def test_tune_alone_in_process(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: tune [options] <recipe> [recipe_args]" in err
    assert "required: recipe" in err


def test_help_describes_everything(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tune [options] <recipe> [recipe_args]")
    for word in (
        "run",
        "ls",
        "cp",
        "download",
        "validate",
        "--nproc-per-node",
        "--nnodes",
        "--rdzv-endpoint",
        "--master-port",
    ):
        assert word in out, word
    for command in ("ls", "cp", "download", "validate"):
        assert main([command, "--help"]) == 0
        assert f"usage: tune {command}" in capsys.readouterr().out


def test_run_recipe_and_config_by_path_with_overrides(recipe_files):
    recipe, config, out = recipe_files
    assert (
        main([str(recipe), "--config", str(config), "model.out_features=7", "optimizer.lr=1e-3"])
        == 0
    )
    record = read_record(out / "record.json")
    assert record["out_features"] == 7 and record["lr"] == 1e-3
    assert record["argv0"] == str(recipe)
    assert record["rank"] == -1  # ran in this process, not through torchrun


def test_tune_run_form_and_relative_paths_and_argv_restored(recipe_files, monkeypatch):
    recipe, config, out = recipe_files
    monkeypatch.chdir(recipe.parent)
    argv_before, path_before = list(sys.argv), list(sys.path)
    assert main(["run", recipe.name, f"--config={config.name}", "epochs=4"]) == 0
    assert read_record(out / "record.json")["epochs"] == 4
    assert sys.argv == argv_before and sys.path == path_before


def test_recipe_exit_code_is_returned(recipe_files):
    recipe, config, out = recipe_files
    assert main([str(recipe), "--config", str(config), "+exit_code=3"]) == 3


def test_config_typo_fails_before_anything_is_built(recipe_files, capsys):
    recipe, config, out = recipe_files
    assert main([str(recipe), "--config", str(config), "optimzer.lr=1e-3"]) == 1
    err = capsys.readouterr().err
    assert "optimzer" in err and "did you mean 'optimizer'?" in err
    assert not (out / "record.json").exists()


def test_packaged_recipe_and_config_by_name(fake_package):
    _, _, out = fake_package
    assert main(["lora_finetune_single_device", "--config", "tiny/lora", "epochs=2"]) == 0
    assert read_record(out / "record.json")["epochs"] == 2
    assert main(["run", "generate.py", "--config", "tiny/generate.yaml"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["lora_finetune", "--config", "x"],
            "unknown recipe 'lora_finetune'. Did you mean: lora_finetune_",
        ),
        (
            ["no_such_dir/recipe.py", "--config", "x"],
            "recipe file not found: no_such_dir/recipe.py",
        ),
        (
            ["generate", "--config", "tiny/genrate"],
            "unknown config 'tiny/genrate'. Did you mean: tiny/generate",
        ),
        (
            ["generate", "--config", "missing_dir/c.yaml"],
            "config file not found: missing_dir/c.yaml",
        ),
    ],
)
def test_unknown_names_list_close_matches_and_tune_ls(fake_package, argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "tune ls" in err


def test_registered_but_missing_file_is_reported(fake_package, capsys):
    recipes, _, _ = fake_package
    (recipes / "generate.py").unlink()
    assert main(["generate", "--config", "tiny/generate"]) == 1
    assert "packaged recipe 'generate' is missing" in capsys.readouterr().err


def test_torchrun_options_are_parsed_by_torchrun(monkeypatch, recipe_files):
    recipe, config, _ = recipe_files
    launched = {}
    monkeypatch.setattr(
        "torchtune._cli.run.launch_distributed",
        lambda args: launched.setdefault("args", args) and 0,
    )
    argv = [
        "--nnodes",
        "1",
        "--nproc-per-node=2",
        "--rdzv_endpoint",
        "localhost:0",
        "--rdzv_backend",
        "c10d",
    ]
    assert main([*argv, str(recipe), "--config", str(config), "epochs=2"]) == 0
    args = launched["args"]
    assert (args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.rdzv_backend) == (
        "1",
        "2",
        "localhost:0",
        "c10d",
    )
    assert args.training_script == str(recipe)
    assert args.training_script_args == ["--config", str(config), "epochs=2"]


def test_torchrun_launch_checks_config_first(recipe_files, monkeypatch, capsys):
    recipe, config, _ = recipe_files
    monkeypatch.setattr(
        "torchtune._cli.run.launch_distributed", lambda args: pytest.fail("launched")
    )
    assert (
        main(["--nproc_per_node", "1", str(recipe), "--config", str(config), "optimzer.lr=1"]) == 1
    )
    assert "did you mean 'optimizer'?" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_launch_of_trivial_recipe(recipe_files):
    recipe, config, out = recipe_files
    argv = [
        "--nnodes",
        "1",
        "--nproc_per_node",
        "1",
        str(recipe),
        "--config",
        str(config),
        "model.out_features=5",
    ]
    assert main(argv) == 0
    record = read_record(out / "record_rank0.json")
    assert (record["rank"], record["world_size"], record["out_features"]) == (0, 1, 5)


@pytest.mark.slow
def test_torchrun_worker_failure_is_reported(recipe_files, capsys):
    recipe, config, _ = recipe_files
    argv = [
        "--nnodes",
        "1",
        "--nproc_per_node",
        "1",
        str(recipe),
        "--config",
        str(config),
        "+exit_code=3",
    ]
    assert main(argv) == 1
    assert f"a worker of {recipe} failed" in capsys.readouterr().err


def test_single_device_recipe_refuses_several_workers(fake_package, monkeypatch, capsys):
    monkeypatch.setattr(
        "torchtune._cli.run.launch_distributed", lambda args: pytest.fail("launched")
    )
    argv = ["--nproc_per_node", "2", "lora_finetune_single_device", "--config", "tiny/lora"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "runs on a single device" in err and "lora_finetune_distributed" in err
    launched = []
    monkeypatch.setattr(
        "torchtune._cli.run.launch_distributed", lambda args: launched.append(args) or 0
    )
    assert (
        main(
            [
                "--nproc_per_node",
                "2",
                "lora_finetune_distributed",
                "--config",
                "tiny/lora_distributed",
            ]
        )
        == 0
    )
    assert (
        main(["--nproc_per_node", "1", "lora_finetune_single_device", "--config", "tiny/lora"]) == 0
    )
    assert len(launched) == 2


def test_typo_acceptance_through_console_script(recipe_files):
    recipe, config, out = recipe_files
    proc = subprocess.run(
        [TUNE, str(recipe), "--config", str(config), "optimzer.lr=1e-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "optimzer" in proc.stderr and "did you mean 'optimizer'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "record.json").exists()
