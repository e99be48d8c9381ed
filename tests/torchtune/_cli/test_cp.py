# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest

from torchtune._cli.tune import main


def test_copy_recipe_into_missing_parent_folders(fake_package, tmp_path, monkeypatch):
    recipes, _, _ = fake_package
    monkeypatch.chdir(tmp_path)
    # exactly as the README writes it
    assert (
        main(["cp", "full_finetune_distributed.py", "my_recipe/full_finetune_distributed.py"]) == 0
    )
    copied = tmp_path / "my_recipe" / "full_finetune_distributed.py"
    assert copied.read_bytes() == (recipes / "full_finetune_distributed.py").read_bytes()


def test_copy_config_into_folder_and_without_suffix(fake_package, tmp_path):
    _, configs, _ = fake_package
    dest = tmp_path / "cfgs"
    dest.mkdir()
    assert main(["cp", "llama2/7B_lora.yaml", str(dest)]) == 0
    assert (dest / "7B_lora.yaml").read_bytes() == (
        configs / "llama2" / "7B_lora.yaml"
    ).read_bytes()
    assert main(["cp", "tiny/lora", str(tmp_path / "new" / "mine")]) == 0
    assert (tmp_path / "new" / "mine.yaml").read_text().startswith("# tiny/lora")
    assert main(["cp", "tiny/full", str(tmp_path / "trailing") + "/", "--make-parents"]) == 0
    assert (tmp_path / "trailing" / "full.yaml").is_file()


def test_refuses_overwrite_unless_force(fake_package, tmp_path, capsys):
    dest = tmp_path / "x.yaml"
    dest.write_text("mine")
    assert main(["cp", "tiny/full", str(dest)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert dest.read_text() == "mine"
    assert main(["cp", "tiny/full", str(dest), "--force"]) == 0
    assert dest.read_text().startswith("# tiny/full")


def test_make_parents_flag_is_accepted(fake_package, tmp_path):
    assert main(["cp", "--make-parents", "generate.py", str(tmp_path / "a" / "b" / "g.py")]) == 0
    assert (tmp_path / "a" / "b" / "g.py").is_file()


def test_name_that_is_recipe_and_config(fake_package, tmp_path, capsys):
    # full_finetune_single_device names both a recipe and a config
    assert main(["cp", "full_finetune_single_device", str(tmp_path / "d")]) == 2
    assert "is both a recipe and a config" in capsys.readouterr().err
    assert main(["cp", "full_finetune_single_device", str(tmp_path / "d.py")]) == 0
    assert "recipe_main" in (tmp_path / "d.py").read_text()
    assert main(["cp", "full_finetune_single_device.yaml", str(tmp_path / "d2")]) == 0
    # An alias copies the file it names.
    assert (tmp_path / "d2.yaml").read_text().startswith("# llama2/7B_full_single_device")


@pytest.mark.parametrize(
    "name, message",
    [
        ("lora_finetune_single_devise.py", "Did you mean: lora_finetune_single_device.py"),
        ("tiny/lroa", "Did you mean: tiny/lora"),
        ("nothing_like_it_at_all", "unknown recipe or config 'nothing_like_it_at_all'"),
    ],
)
def test_unknown_name(fake_package, tmp_path, name, message, capsys):
    assert main(["cp", name, str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert message in err and "tune ls" in err
    assert not (tmp_path / "d").exists()


def test_missing_packaged_file_and_missing_arguments(fake_package, tmp_path, capsys):
    _, configs, _ = fake_package
    (configs / "tiny" / "eval.yaml").unlink()
    assert main(["cp", "tiny/eval", str(tmp_path / "e.yaml")]) == 1
    assert "missing from this installation" in capsys.readouterr().err
    assert main(["cp", "tiny/full"]) == 2
    assert "required: destination" in capsys.readouterr().err
