# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The loop settings and the recipe state: config checks, the ``recipe_state.pt`` round trip,
old files, and the resume errors and warnings."""

import logging

import pytest
import torch

from torchtune.training import LoopSettings, RecipeState, restore_rng_state

CPU = torch.device("cpu")
CFG = {
    "gradient_accumulation_steps": 2,
    "epochs": 3,
    "log_every_n_steps": 1,
    "clip_grad_norm": None,
    "resume_from_checkpoint": False,
    "max_steps_per_epoch": 5,
}


def test_loop_settings_from_config():
    loop = LoopSettings.from_config({**CFG, "clip_grad_norm": "0.5"})
    assert loop == LoopSettings(2, 0.5, 1, False)
    assert LoopSettings.from_config(CFG).clip_grad_norm is None


@pytest.mark.parametrize("key", ["gradient_accumulation_steps", "epochs", "log_every_n_steps"])
def test_loop_settings_reject_values_below_one(key):
    with pytest.raises(ValueError, match=f"Config key '{key}' must be >= 1, got 0"):
        LoopSettings.from_config({**CFG, key: 0})


def test_state_round_trips_through_recipe_state_pt(tmp_path):
    state = RecipeState.from_config(CFG, seed=7)
    assert state == RecipeState(seed=7, total_epochs=3, max_steps_per_epoch=5)
    for _ in range(4):
        state.end_step()
    state.end_epoch()
    state.end_step()  # one step into the next epoch
    torch.manual_seed(123)
    saved = {"optimizer": {"state": {}}, **state.state_dict(CPU)}
    assert set(saved) == {
        "optimizer",
        "epochs_run",
        "total_epochs",
        "max_steps_per_epoch",
        "seed",
        "global_step",
        "steps_in_epoch",
        "rng_state",
    }
    torch.save(saved, tmp_path / "recipe_state.pt")
    expected_draw = torch.rand(3)
    loaded = torch.load(tmp_path / "recipe_state.pt", weights_only=True)
    fresh = RecipeState.from_config(CFG, seed=99)
    resumed = fresh.resumed_from(loaded)
    assert resumed == RecipeState(7, 3, 5, epochs_run=1, global_step=5, steps_in_epoch=1)
    assert fresh.seed == 99  # a new state, the fresh one is untouched
    torch.manual_seed(0)
    restore_rng_state(loaded, CPU)
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)


def test_files_without_a_position_resume_at_the_epoch_start():
    old = {
        "optimizer": {},
        "epochs_run": 1,
        "total_epochs": 3,
        "max_steps_per_epoch": 5,
        "seed": 4,
        "global_step": 5,
        "rng_state": torch.get_rng_state(),
    }
    resumed = RecipeState.from_config(CFG, seed=0).resumed_from(old)
    assert (resumed.epochs_run, resumed.global_step, resumed.steps_in_epoch) == (1, 5, 0)


def test_resume_names_the_missing_keys():
    with pytest.raises(ValueError, match=r"lacks \['optimizer', 'rng_state'\]"):
        RecipeState.from_config(CFG, seed=0).resumed_from(
            {
                "epochs_run": 1,
                "total_epochs": 3,
                "max_steps_per_epoch": 5,
                "seed": 1,
                "global_step": 2,
            }
        )


def test_resume_warns_when_the_totals_change(caplog):
    saved = {"optimizer": {}, **RecipeState(1, 2, None, epochs_run=1).state_dict(CPU)}
    with caplog.at_level(logging.WARNING):
        resumed = RecipeState.from_config(CFG, seed=0).resumed_from(saved)
    assert "Resuming with total_epochs=3; the checkpoint has 2" in caplog.text
    assert "Resuming with max_steps_per_epoch=5; the checkpoint has None" in caplog.text
    assert (resumed.total_epochs, resumed.max_steps_per_epoch) == (3, 5)  # this run's config
    assert not resumed.finished
