# Copyright (c) torchtune contributors. BSD-3-Clause license.
import re
import subprocess
import sys
from pathlib import Path

from torchtune import _recipe_registry as registry
from torchtune._cli.tune import main


def _rows(text):
    lines = text.strip().splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIG"]
    rows, recipe = [], None
    for line in lines[1:]:
        cells = re.sub(r" \(= [^)]+\)$", "", line).split()  # an alias names its file
        if len(cells) == 2:
            recipe = cells[0]
        rows.append((recipe, cells[-1]))
    return rows


def test_ls_lists_every_recipe_with_its_configs(capsys):
    assert main(["ls"]) == 0
    rows = _rows(capsys.readouterr().out)
    expected = [(r.name, c.name) for r in registry.RECIPES for c in r.configs]
    assert rows == expected
    assert ("lora_finetune_distributed", "llama2/13B_lora") in rows


def test_ls_shows_which_file_an_alias_reads(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "lora_finetune_single_device (= llama2/7B_lora_single_device)" in out


def test_ls_through_console_script():
    tune = Path(sys.executable).parent / "tune"
    proc = subprocess.run([str(tune), "ls"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _rows(proc.stdout)[0] == ("full_finetune_single_device", "full_finetune_single_device")


def test_ls_rejects_arguments(capsys):
    assert main(["ls", "extra"]) == 2
    assert "unrecognized arguments: extra" in capsys.readouterr().err
