# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune --nproc_per_node 2 lora_dpo_distributed`` on CPU (gloo) against the single-device DPO
recipe with the same global batch, from a PEFT adapter and from a fresh one; resume."""

from pathlib import Path

import pytest
import torch

from tests.recipes.single_device_utils import read_disk_log, run_tune, tiny_overrides
from tests.recipes.test_full_finetune_distributed import (
    PER_RANK_BATCH,
    WORLD_SIZE,
    run_tune_distributed,
)
from tests.recipes.test_lora_dpo_single_device import CONFIG, LOSSES, METRICS, assets, peft_adapter  # noqa: F401
from tests.recipes.test_lora_dpo_single_device import RECIPE as SINGLE_RECIPE
from torchtune.recipes import lora_dpo_distributed

RECIPE = str(Path(lora_dpo_distributed.__file__))
COMMON = [
    "shuffle=True",
    "seed=5",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=2",
    "optimizer.lr=3e-3",
    "lr_scheduler.num_warmup_steps=1",
    "model.lora_rank=4",
    "model.lora_alpha=8",
    "model.lora_attn_modules=[q_proj,v_proj]",
    "clip_grad_norm=1.0",
]


def _overrides(assets, out, per_rank, *extra):  # noqa: F811
    batch = PER_RANK_BATCH if per_rank else PER_RANK_BATCH * WORLD_SIZE
    return tiny_overrides(assets, out) + COMMON + [f"batch_size={batch}", *extra]


def _assert_same_metrics(ours, expected, atol):
    """Every logged metric within ``atol``; the summed log-probabilities (about -100, where an
    fp32 ulp is 1e-5) within ``atol`` relative instead."""
    assert [r["step"] for r in ours] == [r["step"] for r in expected]
    for name in (*METRICS, "lr"):
        tol = dict(rtol=atol, atol=0) if name.startswith("logps/") else dict(rtol=0, atol=atol)
        torch.testing.assert_close(
            torch.tensor([r[name] for r in ours], dtype=torch.float64),
            torch.tensor([r[name] for r in expected], dtype=torch.float64),
            msg=name,
            **tol,
        )


@pytest.mark.slow
@pytest.mark.parametrize("start", ["peft_adapter", "fresh", "fresh_dora"])
def test_two_ranks_match_one_device(assets, peft_adapter, tmp_path, start):  # noqa: F811
    extra = [f"checkpointer.adapter_checkpoint={peft_adapter}"] if start == "peft_adapter" else []
    if start == "fresh_dora":  # the magnitudes come from the base weights on rank 0
        extra += ["model.use_dora=True"]
    extra += LOSSES["dpo"]
    single, dist = tmp_path / "single", tmp_path / "dist"
    single.mkdir(), dist.mkdir()
    run_tune(SINGLE_RECIPE, CONFIG, _overrides(assets, single, False, *extra), cwd=single)
    run_tune_distributed(RECIPE, CONFIG, _overrides(assets, dist, True, *extra), cwd=dist)
    ours, expected = read_disk_log(dist), read_disk_log(single)
    assert len(ours) == 4
    _assert_same_metrics(ours, expected, atol=1e-5)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_run(assets, peft_adapter, tmp_path):  # noqa: F811
    extra = [f"checkpointer.adapter_checkpoint={peft_adapter}", *LOSSES["ipo"]]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    overrides = _overrides(assets, full, True, *extra)
    run_tune_distributed(RECIPE, CONFIG, overrides, cwd=full)
    resume = [
        f"checkpointer.adapter_checkpoint={full / 'epoch_1_adapter' / 'adapter.safetensors'}",
        f"checkpointer.recipe_checkpoint={full / 'epoch_1_state' / 'recipe_state.pt'}",
        "resume_from_checkpoint=True",
        f"output_dir={resumed}",
    ]
    run_tune_distributed(RECIPE, CONFIG, overrides + resume, cwd=resumed)
    _assert_same_metrics(read_disk_log(resumed), read_disk_log(full)[2:], atol=1e-6)


@pytest.mark.slow
def test_step_checkpoint_resume_by_one_switch_on_two_ranks(assets, peft_adapter, tmp_path):  # noqa: F811
    """A step checkpoint in the middle of epoch 1, resumed with ``resume_from_checkpoint=True``
    alone (the run's PEFT starting adapter still in the config), logs the uninterrupted run."""
    import json
    import shutil

    from torchtune.utils import read_checkpoints

    extra = [f"checkpointer.adapter_checkpoint={peft_adapter}", "save_every_n_steps=1"]
    straight = tmp_path / "straight"
    overrides = _overrides(assets, straight, True, *extra)
    run_tune_distributed(RECIPE, CONFIG, overrides, cwd=tmp_path)
    names = [e["name"] for e in read_checkpoints(straight)]
    assert names == ["step_1", "epoch_1", "step_3", "epoch_2"]
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    index = json.loads((cut / "checkpoints.json").read_text())
    index["checkpoints"] = index["checkpoints"][:1]  # as if killed during step 2
    (cut / "checkpoints.json").write_text(json.dumps(index))
    log_dir = tmp_path / "resumed_log"
    resume = [f"output_dir={cut}", f"metric_logger.log_dir={log_dir}"]
    run_tune_distributed(
        RECIPE, CONFIG, overrides + resume + ["resume_from_checkpoint=True"], cwd=tmp_path
    )
    _assert_same_metrics(read_disk_log(log_dir), read_disk_log(straight)[1:], atol=1e-6)
