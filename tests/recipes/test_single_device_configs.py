# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The single-device configs validate and share one key set."""

import subprocess
import sys
from pathlib import Path

import pytest

from torchtune import config
from torchtune._recipe_registry import get_config

TRAINING_KEYS = {
    "model",
    "tokenizer",
    "checkpointer",
    "resume_from_checkpoint",
    "dataset",
    "seed",
    "shuffle",
    "batch_size",
    "optimizer",
    "lr_scheduler",
    "loss",
    "epochs",
    "max_steps_per_epoch",
    "max_steps",
    "save_every_n_steps",
    "keep_last_n_checkpoints",
    "gradient_accumulation_steps",
    "clip_grad_norm",
    "device",
    "dtype",
    "enable_activation_checkpointing",
    "compile",
    "metric_logger",
    "log_every_n_steps",
    "output_dir",
}


# Keys a config may leave out (the recipes read them with cfg.get).
OPTIONAL_KEYS = {"validation_dataset", "eval_every_n_steps", "validation_batch_size"}


def assert_training_keys(name, cfg):
    assert TRAINING_KEYS <= set(cfg.keys()) <= TRAINING_KEYS | OPTIONAL_KEYS, name


CONFIGS = [
    "full_finetune_single_device",
    "lora_finetune_single_device",
    "llama2/7B_full_single_device",
    "llama2/7B_lora_single_device",
    "llama2/13B_lora",
    "tiny/full",
    "tiny/lora",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_with_the_contract_keys(name):
    path = get_config(name).file_path
    cfg = config.load_config(path)
    config.validate(cfg)  # what `tune validate` runs
    assert_training_keys(name, cfg)
    first_line = path.read_text().splitlines()[0]
    target = get_config(name).alias_of or name  # an alias reads its target's file
    assert first_line.startswith("# tune ") and f"--config {target}" in first_line


@pytest.mark.parametrize("name", ["full_finetune_single_device", "lora_finetune_single_device"])
def test_full_configs_have_no_schedule_or_clipping_by_default(name):
    cfg = config.load_config(get_config(name).file_path)
    if name.startswith("full"):
        assert cfg.lr_scheduler is None and cfg.clip_grad_norm is None
    else:
        assert cfg.lr_scheduler._component_.endswith("get_cosine_schedule_with_warmup")


def test_tune_validate_cli_on_7b_lora():
    tune = Path(sys.executable).parent / "tune"
    proc = subprocess.run(
        [str(tune), "validate", "--config", "llama2/7B_lora_single_device"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "config is valid" in proc.stdout
