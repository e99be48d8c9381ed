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


@pytest.mark.parametrize("key", ["save_every_n_steps", "max_steps", "keep_last_n_checkpoints"])
def test_optional_step_keys_are_null_or_positive(key):
    assert LoopSettings.from_config({**CFG, key: None}).save_every_n_steps is None
    with pytest.raises(ValueError, match=f"Config key '{key}' must be null or >= 1, got 0"):
        LoopSettings.from_config({**CFG, key: 0})


def _walk(state: RecipeState, steps_per_epoch: int, every):
    """The recipes' loop without the model: (name, final) of every checkpoint written."""
    saved = []
    for _ in state.remaining_epochs():
        for _ in range(state.steps_in_epoch, state.epoch_steps(steps_per_epoch)):
            state.end_step()
            if state.step_checkpoint_due(every, steps_per_epoch):
                saved.append((state.checkpoint_name, state.finished))
        state.close_epoch(steps_per_epoch)
        saved.append((state.checkpoint_name, state.finished))
    return saved


def test_step_checkpoints_epoch_checkpoints_and_max_steps():
    state = RecipeState.from_config({**CFG, "max_steps": None}, seed=0)
    assert state.total_steps(5) == 15
    assert _walk(state, 5, every=2) == [
        ("step_2", False),
        ("step_4", False),
        ("epoch_1", False),
        ("step_6", False),
        ("step_8", False),
        ("epoch_2", False),
        ("step_12", False),
        ("step_14", False),
        ("epoch_3", True),
    ]
    # max_steps ends the run mid-epoch: the last checkpoint is step_N, final; the schedule
    # is max_steps long.
    state = RecipeState.from_config({**CFG, "max_steps": 7}, seed=0)
    assert state.total_steps(5) == 7
    assert _walk(state, 5, every=3) == [
        ("step_3", False),
        ("epoch_1", False),
        ("step_6", False),
        ("step_7", True),
    ]
    assert (state.global_step, state.epochs_run, state.steps_in_epoch) == (7, 1, 2)
    # Resumed from step_6 (mid-epoch): the same remaining checkpoints.
    resumed = RecipeState.from_config({**CFG, "max_steps": 7}, seed=0)
    resumed.global_step, resumed.epochs_run, resumed.steps_in_epoch = 6, 1, 1
    assert _walk(resumed, 5, every=3) == [("step_7", True)]
    # max_steps at an epoch's end: epoch_N is the final one.
    state = RecipeState.from_config({**CFG, "max_steps": 10}, seed=0)
    assert _walk(state, 5, every=None) == [("epoch_1", False), ("epoch_2", True)]


def test_finished_checkpoint_resumes_to_nothing(caplog):
    state = RecipeState.from_config(CFG, seed=0)
    done = {"name": "step_7", "global_step": 7, "epochs_run": 1, "steps_in_epoch": 2}
    with caplog.at_level(logging.INFO):
        resumed = state.resumed_from({"finished_checkpoint": done})
    assert resumed.finished and list(resumed.remaining_epochs()) == []
    assert "finished" in caplog.text and "nothing to do" in caplog.text


def test_resume_signature_refuses_other_batches():
    from torchtune.training import check_resume_signature, run_signature

    cfg = {"dataset": {"source": "json", "max_seq_len": 64}, "batch_size": 4}
    cfg["gradient_accumulation_steps"] = 2
    ours = run_signature(cfg, list(range(40)), world_size=1)
    saved = {"run_signature": ours}
    check_resume_signature(saved, ours)  # the same run
    # W ranks of b/W samples draw the one-device batches: accepted.
    check_resume_signature(saved, run_signature({**cfg, "batch_size": 2}, range(40), 2))
    check_resume_signature({}, ours)  # recipe state from before signatures: unchecked
    cases = {
        "world_size x batch_size: the checkpoint has 1 x 4, this run 2 x 4": run_signature(
            cfg, range(40), 2
        ),
        "world_size x batch_size: the checkpoint has 1 x 4, this run 1 x 8": run_signature(
            {**cfg, "batch_size": 8}, range(40), 1
        ),
        "gradient_accumulation_steps: the checkpoint has 2, this run 1": run_signature(
            {**cfg, "gradient_accumulation_steps": 1}, range(40), 1
        ),
        "dataset: the checkpoint's has 40 samples .*, this run's 39": run_signature(
            cfg, range(39), 1
        ),
    }
    for message, theirs in cases.items():
        with pytest.raises(ValueError, match=message):
            check_resume_signature(saved, theirs)
    other = run_signature({**cfg, "dataset": {"source": "json", "max_seq_len": 32}}, range(40))
    with pytest.raises(ValueError, match=f"config hash {ours['dataset']['config_sha256'][:12]}"):
        check_resume_signature(saved, other)


def test_resume_signature_ignores_the_key_order_of_the_dataset_node():
    from omegaconf import OmegaConf

    from torchtune.training import run_signature

    def sig(node):
        cfg = OmegaConf.create({"dataset": node, "batch_size": 4, "gradient_accumulation_steps": 1})
        return run_signature(cfg, range(40))["dataset"]["config_sha256"]

    a = {"_component_": "x.y", "source": "json", "max_seq_len": 64}
    assert sig(a) == sig(dict(reversed(list(a.items()))))  # e.g. a YAML rewritten sorted
    assert sig(a) != sig({**a, "max_seq_len": 32})
