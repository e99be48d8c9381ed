# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune plan`` against real runs: predicted peaks within 10%, and ``--memory``'s
recommendation measured under its budget with the same effective batch."""

import json
import subprocess
import sys

import pytest

from benchmarks import plan_accuracy as P
from torchtune import _recipe_registry as registry


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tiny_full_b4_ac", "tiny_lora_b4_packed"])
def test_predicted_peak_within_ten_percent(case, tmp_path):
    small = tmp_path / "unused"  # tiny cases read the packaged checkpoint
    row = P.run_case(case, small, tmp_path)
    assert abs(row["ratio"] - 1) <= 0.10, row


def _plan(overrides, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "torchtune._cli.tune", "plan", "--config", "tiny/full", "--json",
         *extra, *overrides],
        capture_output=True, text=True, env=P._env(), check=True,
    ).stdout  # fmt: skip
    return json.loads(out)


@pytest.mark.slow
def test_memory_recommendation_fits_when_measured(tmp_path):
    small = P.write_small_checkpoint(tmp_path / "small")
    _, _, overrides = P.case_overrides("small_full_b4", small, tmp_path / "run")
    default = _plan(overrides)
    budget = int(default["predicted_peak_bytes"] * 0.96)
    fit = _plan(overrides, "--memory", str(budget))
    recommended = fit["recommended_overrides"]
    assert fit["fits"] is False and recommended
    values = dict(o.split("=", 1) for o in overrides + recommended)  # later ones win
    assert int(values["batch_size"]) * int(values.get("gradient_accumulation_steps", 1)) == 4
    out = tmp_path / "peaks.json"
    subprocess.run(
        [sys.executable, "-m", "torchtune._cli._plan_measure", "--recipe",
         str(registry.get_recipe("full_finetune_single_device").file_path), "--config",
         str(registry.get_config("tiny/full").file_path), "--out", str(out),
         *overrides, *recommended],
        capture_output=True, text=True, env=P._env(), check=True,
    )  # fmt: skip
    measured = json.loads(out.read_text())["peak_bytes"]
    assert measured <= budget, (measured, budget, recommended)
