# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune plan``: config errors as ``tune validate``, the JSON contract, ``--memory``."""

import json

import pytest

from torchtune import config
from torchtune._cli.plan import parse_size, recipe_for
from torchtune._cli.tune import main


def test_unknown_key_fails_with_validates_message(capsys):
    args = ["--config", "tiny/full", "optimzer.lr=1e-3", "model.bias=false"]
    assert main(["validate", *args]) == 1
    validate_err = capsys.readouterr().err
    assert main(["plan", *args]) == 1
    assert capsys.readouterr().err == validate_err
    assert "optimzer: unknown key" in validate_err


def test_missing_checkpoint_fails_as_the_run_would(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    override = f"checkpointer.checkpoint_dir={missing}"
    assert main(["plan", "--config", "tiny/full", override]) == 1
    err = capsys.readouterr().err
    cfg = config.load_config(config.resolve_config_path("tiny/full"), [override])
    with pytest.raises((FileNotFoundError, ValueError)) as run_error:
        config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
    assert err == f"tune plan: error: {run_error.value}\n"
    assert str(missing) in err


@pytest.mark.parametrize(
    "text, expected",
    [("24GiB", 24 * 2**30), ("500MB", 500 * 10**6), ("1.5gib", int(1.5 * 2**30)), ("123", 123)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12 parsecs", "GiB", "-1GiB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="--memory"):
        parse_size(text)


def test_recipe_for_packaged_and_file_configs(tmp_path):
    from torchtune import _recipe_registry as registry

    path = registry.get_config("tiny/lora").file_path
    assert recipe_for("tiny/lora", path) == "lora_finetune_single_device"
    copy = tmp_path / "mine.yaml"
    copy.write_text(registry.get_config("tiny/full").file_path.read_text())
    assert recipe_for(str(copy), copy) == "full_finetune_single_device"


@pytest.mark.slow
def test_json_contract_and_memory_keeps_the_effective_batch(capsys, tmp_path):
    base = ["--config", "tiny/full", "--json", "max_steps_per_epoch=2", f"output_dir={tmp_path}"]
    assert main(["plan", *base]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["predicted_peak_bytes"] == plan["phases"][plan["peak_phase"]]
    assert plan["predicted_peak_bytes"] == max(plan["phases"].values())
    assert {"runtime", "gradients", "optimizer state", "activations (kept)"} <= set(
        plan["components"]
    )
    # Below the peak by less than the training extras: something must change.
    training_extra = plan["phases"]["train"] - plan["phases"]["setup"]
    budget = plan["predicted_peak_bytes"] - training_extra // 4
    assert main(["plan", *base, "--memory", str(budget)]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["fits"] is False and fit["recommended_overrides"]
    values = dict(o.split("=", 1) for o in fit["recommended_overrides"])
    batch = int(values.get("batch_size", 8)) * int(values.get("gradient_accumulation_steps", 1))
    assert batch == 8  # tiny/full: batch_size 8, no accumulation
    ranked = [a["saved_bytes"] for a in fit["alternatives"]]
    assert ranked == sorted(ranked, reverse=True)
