# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune --nproc_per_node 2 full_dpo_distributed`` on CPU (gloo) against one rank with the same
global batch; resume (the reference read from ``ref_checkpointer``) against the whole run."""

from pathlib import Path

import pytest
import yaml

from tests.recipes.single_device_utils import read_disk_log, tiny_overrides
from tests.recipes.test_full_finetune_distributed import (
    PER_RANK_BATCH,
    WORLD_SIZE,
    assert_same_weights,
    run_tune_distributed,
)
from tests.recipes.test_lora_dpo_distributed import _assert_same_metrics
from tests.recipes.test_lora_dpo_single_device import LOSSES, assets  # noqa: F401
from torchtune._recipe_registry import get_config
from torchtune.recipes import full_dpo_distributed

RECIPE = str(Path(full_dpo_distributed.__file__))
CONFIG = get_config("tiny/full_dpo").file_path
COMMON = [
    "shuffle=True",
    "seed=5",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=2",
    "optimizer.lr=1e-3",
    "lr_scheduler.num_warmup_steps=1",
    "clip_grad_norm=1.0",
    *LOSSES["dpo"],
]


def _overrides(assets, out, batch, *extra):  # noqa: F811
    return tiny_overrides(assets, out) + COMMON + [f"batch_size={batch}", *extra]


@pytest.mark.slow
def test_two_ranks_match_one_rank(assets, tmp_path):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    launch_one = ["--nnodes", "1", "--nproc_per_node", "1"]
    overrides = _overrides(assets, one, PER_RANK_BATCH * WORLD_SIZE)
    run_tune_distributed(RECIPE, str(CONFIG), overrides, cwd=one, launcher=launch_one)
    run_tune_distributed(RECIPE, str(CONFIG), _overrides(assets, two, PER_RANK_BATCH), cwd=two)
    ours, expected = read_disk_log(two), read_disk_log(one)
    assert len(ours) == 4
    _assert_same_metrics(ours, expected, atol=1e-5)
    assert ours[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # at the reference
    assert abs(ours[-1]["rewards/margins"]) > 1e-4  # the policy moved off it
    assert_same_weights(one / "epoch_2/model.safetensors", two / "epoch_2/model.safetensors", 1e-5)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_run(assets, tmp_path):  # noqa: F811
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    overrides = _overrides(assets, full, PER_RANK_BATCH)
    run_tune_distributed(RECIPE, str(CONFIG), overrides, cwd=full)
    # The reference is the original model; the policy resumes from epoch_1.
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["ref_checkpointer"] = dict(
        cfg["checkpointer"], checkpoint_dir=str(assets.model_dir), output_dir=str(resumed)
    )
    resume_config = tmp_path / "resume.yaml"
    resume_config.write_text(yaml.safe_dump(cfg))
    resume = [
        f"checkpointer.checkpoint_dir={full / 'epoch_1'}",
        f"checkpointer.recipe_checkpoint={full / 'epoch_1_state' / 'recipe_state.pt'}",
        "resume_from_checkpoint=True",
        f"output_dir={resumed}",
    ]
    run_tune_distributed(RECIPE, str(resume_config), overrides + resume, cwd=resumed)
    _assert_same_metrics(read_disk_log(resumed), read_disk_log(full)[2:], atol=1e-6)
    name = "epoch_2/model.safetensors"
    assert_same_weights(full / name, resumed / name, atol=1e-6)


def test_resume_without_a_reference_checkpointer_is_refused(assets, tmp_path):  # noqa: F811
    from torchtune import config
    from torchtune.recipes.full_dpo_distributed import FullDPORecipeDistributed

    cfg = config.load_config(CONFIG, _overrides(assets, tmp_path, 2, "resume_from_checkpoint=True"))
    recipe = FullDPORecipeDistributed.__new__(FullDPORecipeDistributed)  # no process group
    recipe._rank, recipe._loop = 0, type("L", (), {"resume": True})()
    with pytest.raises(ValueError, match="resume_from_checkpoint=True needs ref_checkpointer"):
        recipe.setup(cfg)
