# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune plan``: config errors as ``tune validate``, the JSON contract, ``--memory``."""

import json
import os
import subprocess
import sys

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


def _plan_json(*args):
    # A fresh process each: the runtime share is measured in the planning process.
    out = subprocess.run(
        [sys.executable, "-m", "torchtune._cli.tune", "plan", "--json", *args],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).stdout  # fmt: skip
    return json.loads(out)


@pytest.mark.slow
def test_json_contract_and_memory_keeps_the_effective_batch(tmp_path):
    base = ["--config", "tiny/full", "max_steps_per_epoch=2", f"output_dir={tmp_path}"]
    plan = _plan_json(*base)
    assert plan["predicted_peak_bytes"] == plan["phases"][plan["peak_phase"]]
    assert plan["predicted_peak_bytes"] == max(plan["phases"].values())
    assert {"runtime", "gradients", "optimizer state", "activations (kept)"} <= set(
        plan["components"]
    )
    roomy = _plan_json(*base, "--memory", str(2 * plan["predicted_peak_bytes"]))
    assert roomy["fits"] is True and roomy["recommended_overrides"] == []
    # Below the peak by half what the best batch or checkpointing change saves.
    keeps_data = [a for a in roomy["alternatives"] if not a["overrides"][0].startswith("dataset.")]
    budget = roomy["predicted_peak_bytes"] - max(a["saved_bytes"] for a in keeps_data) // 2
    fit = _plan_json(*base, "--memory", str(budget))
    assert fit["fits"] is False and fit["recommended_overrides"]
    values = dict(o.split("=", 1) for o in fit["recommended_overrides"])
    batch = int(values.get("batch_size", 8)) * int(values.get("gradient_accumulation_steps", 1))
    assert batch == 8  # tiny/full: batch_size 8, no accumulation
    ranked = [a["saved_bytes"] for a in fit["alternatives"]]
    assert ranked == sorted(ranked, reverse=True)
