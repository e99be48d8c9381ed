# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The real ``tune`` CLI surviving an out-of-memory step (``TUNE_TEST_OOM_AT_STEP``): the run
continues with half the micro-batch and its losses equal an uninterrupted run configured with
that micro-batch and twice the accumulation; repeated errors stop it with a message that
names ``tune plan``; on two ranks (gloo) an error on one rank only is survived too and no
process is left behind."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil
import pytest
import torch

from tests.recipes.single_device_utils import logged_losses
from tests.recipes.test_full_finetune_distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# The shipped tiny configs (bundled model, tokenizer and data), 5 shuffled steps.
COMMON = ["shuffle=True", "seed=3", "epochs=1", "max_steps_per_epoch=5", "dtype=fp32"]
COMMON += ["clip_grad_norm=1.0", "log_every_n_steps=1"]
OOM_STEP = 3


def tune(
    recipe: str,
    config_name: str,
    overrides: Sequence[str],
    out: Path,
    env: Optional[Dict[str, str]] = None,
    nproc: int = 1,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    tune_bin = Path(sys.executable).parent / "tune"
    launcher = []
    if nproc > 1:
        launcher = ["--nnodes", "1", "--nproc_per_node", str(nproc)]
        launcher += ["--master_port", str(free_port())]
    cmd = [str(tune_bin), *launcher, recipe, "--config", config_name, *overrides]
    cmd.append(f"output_dir={out}")
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")])
    )
    return subprocess.run(
        cmd, cwd=out, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(proc.args)} exited with {proc.returncode}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def left_behind(out: Path) -> List[str]:
    """Processes still running whose command line names this run's output folder."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if f"output_dir={out}" in cmdline:
            found.append(f"{p.info['pid']}: {cmdline[:200]}")
    return found


def _oom_vs_halved(
    tmp_path: Path,
    recipe: str,
    config_name: str,
    batch: int,
    extra: Sequence[str] = (),
    nproc: int = 1,
    oom_env: Optional[Dict[str, str]] = None,
):
    """Run with ``batch`` and an OOM at step 3, and uninterrupted with ``batch / 2`` x 2."""
    runs = {}
    for name, bs, ga, env in (
        ("oom", batch, 1, {"TUNE_TEST_OOM_AT_STEP": str(OOM_STEP), **(oom_env or {})}),
        ("halved", batch // 2, 2, {}),
    ):
        out = tmp_path / name
        out.mkdir()
        overrides = [*COMMON, *extra, f"batch_size={bs}", f"gradient_accumulation_steps={ga}"]
        proc = ok(tune(recipe, config_name, overrides, out, env=env, nproc=nproc))
        runs[name] = (out, proc)
    return runs


@pytest.mark.slow
def test_single_device_oom_continues_with_half_the_micro_batch(tmp_path):
    runs = _oom_vs_halved(tmp_path, "full_finetune_single_device", "tiny/full", batch=4)
    out = tmp_path / "whole"
    out.mkdir()
    whole = [*COMMON, "batch_size=4", "gradient_accumulation_steps=1"]
    ok(tune("full_finetune_single_device", "tiny/full", whole, out))
    oom, halved, unsplit = (logged_losses(d) for d in (runs["oom"][0], runs["halved"][0], out))
    assert len(oom) == len(halved) == len(unsplit) == 5
    torch.testing.assert_close(oom, halved, rtol=0, atol=1e-5)
    print(f"max |loss diff| vs the halved run: {(oom - halved).abs().max():.2e}")
    # Before the error: the batch-4 run's steps, computed the same way.
    torch.testing.assert_close(oom[: OOM_STEP - 1], unsplit[: OOM_STEP - 1], rtol=0, atol=1e-6)
    log = runs["oom"][1].stderr
    assert f"Out of memory at step {OOM_STEP}" in log
    assert "micro-batch 4 -> 2, micro-batches per step 1 -> 2" in log
    assert "Out of memory" not in runs["halved"][1].stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,config",
    [("lora_finetune_single_device", "tiny/lora"), ("lora_dpo_single_device", "tiny/lora_dpo")],
    ids=["lora", "dpo_pairs"],
)
def test_single_device_lora_and_dpo_oom_continue_with_half_the_micro_batch(
    tmp_path, recipe, config
):
    runs = _oom_vs_halved(tmp_path, recipe, config, batch=4)
    oom, halved = (logged_losses(runs[k][0]) for k in ("oom", "halved"))
    assert len(oom) == 5
    torch.testing.assert_close(oom, halved, rtol=0, atol=1e-5)
    print(f"max |loss diff| vs the halved run: {(oom - halved).abs().max():.2e}")
    assert "micro-batch 4 -> 2" in runs["oom"][1].stderr


@pytest.mark.slow
def test_repeated_oom_stops_naming_tune_plan(tmp_path):
    env = {"TUNE_TEST_OOM_AT_STEP": "2", "TUNE_TEST_OOM_TIMES": "100"}
    overrides = [*COMMON, "batch_size=4", "gradient_accumulation_steps=1"]
    proc = tune("full_finetune_single_device", "tiny/full", overrides, tmp_path, env, timeout=300)
    assert proc.returncode != 0
    assert "tune plan" in proc.stderr and "cannot be halved again (it is 1)" in proc.stderr
    assert "micro-batch 4 -> 2" in proc.stderr and "micro-batch 2 -> 1" in proc.stderr
    # max_oom_retries caps the halvings.
    out = tmp_path / "capped"
    out.mkdir()
    proc = tune(
        "full_finetune_single_device",
        "tiny/full",
        [*overrides, "+max_oom_retries=1"],
        out,
        env,
        timeout=300,
    )
    assert proc.returncode != 0 and "max_oom_retries=1 reached" in proc.stderr
    assert "tune plan" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, config_name",
    [
        ("full_finetune_distributed", "tiny/full_distributed"),
        ("lora_finetune_distributed", "tiny/lora_distributed"),
        ("lora_dpo_distributed", "tiny/lora_dpo_distributed"),
        ("full_dpo_distributed", "tiny/full_dpo"),
    ],
)
def test_two_ranks_survive_an_oom_on_rank_one(tmp_path, recipe, config_name):
    runs = _oom_vs_halved(
        tmp_path, recipe, config_name, batch=2, nproc=2, oom_env={"TUNE_TEST_OOM_RANK": "1"}
    )
    oom, halved = (logged_losses(runs[k][0]) for k in ("oom", "halved"))
    assert len(oom) == 5
    torch.testing.assert_close(oom, halved, rtol=0, atol=1e-5)
    print(f"max |loss diff| vs the halved run: {(oom - halved).abs().max():.2e}")
    log = runs["oom"][1].stderr
    assert f"Out of memory at step {OOM_STEP} on 1 of 2 ranks" in log
    assert "micro-batch 2 -> 1" in log
    for out, _ in runs.values():
        assert left_behind(out) == []


@pytest.mark.slow
def test_two_ranks_stop_together_when_rank_one_keeps_running_out(tmp_path):
    env = {"TUNE_TEST_OOM_AT_STEP": "2", "TUNE_TEST_OOM_TIMES": "100", "TUNE_TEST_OOM_RANK": "1"}
    overrides = [*COMMON, "batch_size=2", "gradient_accumulation_steps=1"]
    proc = tune(
        "full_finetune_distributed", "tiny/full_distributed", overrides, tmp_path, env, 2, 300
    )
    assert proc.returncode != 0
    assert "tune plan" in proc.stderr and "cannot be halved again (it is 1)" in proc.stderr
    assert left_behind(tmp_path) == []
