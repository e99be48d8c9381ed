# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The distributed configs validate with the contract keys and mirror their single-device
twins (that the recipes share their code through the kit: test_recipes_share_no_code.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.recipes.test_single_device_configs import assert_training_keys
from torchtune import config
from torchtune._recipe_registry import RECIPES, get_config

CONFIGS = {
    "full_finetune_distributed": "full_finetune_distributed",
    "llama2/7B_full": "full_finetune_distributed",
    "tiny/full_distributed": "full_finetune_distributed",
    "lora_finetune_distributed": "lora_finetune_distributed",
    "llama2/7B_lora": "lora_finetune_distributed",
    "tiny/lora_distributed": "lora_finetune_distributed",
}


def _container(name):
    return OmegaConf.to_container(OmegaConf.load(get_config(name).file_path))


@pytest.mark.parametrize("name, recipe", sorted(CONFIGS.items()))
def test_config_validates_and_names_its_launch_command(name, recipe):
    assert name in [c.name for r in RECIPES if r.name == recipe for c in r.configs]
    path = get_config(name).file_path
    cfg = config.load_config(path)
    config.validate(cfg)
    assert_training_keys(name, cfg)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# tune --nnodes 1 --nproc_per_node ")
    target = get_config(name).alias_of or name  # an alias reads its target's file
    assert first_line.endswith(f" {recipe} --config {target}")


@pytest.mark.parametrize(
    "dist, single, differ",
    [
        ("tiny/full_distributed", "tiny/full", {"batch_size", "output_dir"}),
        ("tiny/lora_distributed", "tiny/lora", {"batch_size", "output_dir"}),
        (
            "llama2/7B_full",
            "llama2/7B_full_single_device",
            {"gradient_accumulation_steps", "output_dir"},
        ),
        (
            "llama2/7B_lora",
            "llama2/7B_lora_single_device",
            {"gradient_accumulation_steps", "output_dir"},
        ),
    ],
)
def test_distributed_configs_differ_from_their_single_device_twins_only_in_scale(
    dist, single, differ
):
    a, b = _container(dist), _container(single)
    assert {k for k in a if a[k] != b[k]} == differ
    # Launched on 2 ranks (the header's --nproc_per_node 2), the global batch is the same.
    assert "--nproc_per_node 2 " in get_config(dist).file_path.read_text().splitlines()[0]
    global_batch = 2 * a["batch_size"] * a["gradient_accumulation_steps"]
    assert global_batch == b["batch_size"] * b["gradient_accumulation_steps"]


def test_without_torchrun_the_recipe_says_how_to_launch(tmp_path):
    tune = Path(sys.executable).parent / "tune"
    proc = subprocess.run(
        [
            str(tune),
            "full_finetune_distributed",
            "--config",
            "tiny/full_distributed",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "--nproc_per_node" in proc.stderr and "'RANK'" in proc.stderr, proc.stderr[-3000:]
