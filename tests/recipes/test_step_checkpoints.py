# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Step checkpoints and resume by one switch, through the real ``tune`` CLI: a run killed with
SIGKILL at a step (or in the middle of a checkpoint write) and resumed with
``resume_from_checkpoint=True`` logs the uninterrupted run's losses and ends with its weights,
full and LoRA, on one device and on two ranks; a resume that would see other batches is
refused; ``keep_last_n_checkpoints`` and ``max_steps``."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.single_device_utils import (
    build_tiny_assets,
    logged_losses,
    read_disk_log,
    run_tune,
    tiny_overrides,
)
from tests.recipes.test_full_finetune_distributed import free_port, run_tune_distributed, tune_env
from torchtune import config
from torchtune._recipe_registry import get_config
from torchtune.utils import read_checkpoints

# 40 samples, batches of 2 per device, 2 micro-batches a step: 5 steps an epoch, 10 in all;
# a step checkpoint every 2 steps, except where epoch_1 (step 5) and epoch_2 (step 10) fall.
COMMON = [
    "shuffle=True",
    "seed=3",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=5",
    "dtype=fp32",
    "log_every_n_steps=1",
    "save_every_n_steps=2",
    "keep_last_n_checkpoints=2",
]
FULL = ["optimizer.lr=2e-4"]
# Dropout draws from the RNG on every step: a resume must restore it exactly.
LORA = ["optimizer.lr=3e-3", "lr_scheduler.num_warmup_steps=2", "model.lora_dropout=0.1"]
VARIANTS = {
    "full": ("full_finetune_single_device", "tiny/full", FULL, ["model.safetensors"]),
    "lora": (
        "lora_finetune_single_device",
        "tiny/lora",
        LORA,
        ["model.safetensors", "_adapter/adapter.safetensors"],
    ),
    "full_2ranks": ("full_finetune_distributed", "tiny/full_distributed", FULL, None),
    "lora_2ranks": ("lora_finetune_distributed", "tiny/lora_distributed", LORA, None),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("step_ckpt_assets"))


def _overrides(assets, variant: str, out: Path) -> List[str]:
    _, _, extra, _ = VARIANTS[variant]
    per_rank = 1 if variant.endswith("2ranks") else 2  # the same global batch of 2
    return tiny_overrides(assets, out) + COMMON + extra + [f"batch_size={per_rank}"]


def _cmd(variant: str, overrides: Sequence[str]) -> List[str]:
    recipe, config_name, _, _ = VARIANTS[variant]
    tune = str(Path(sys.executable).parent / "tune")
    launcher = []
    if variant.endswith("2ranks"):
        launcher = ["--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(free_port())]
    return [tune, *launcher, recipe, "--config", config_name, *overrides]


def _run(variant: str, overrides: Sequence[str], cwd: Path) -> None:
    recipe, config_name, _, _ = VARIANTS[variant]
    if variant.endswith("2ranks"):
        run_tune_distributed(recipe, config_name, overrides, cwd=cwd)
    else:
        run_tune(recipe, config_name, overrides, cwd=cwd)


def _run_and_kill(variant: str, overrides, cwd: Path, out: Path, when, env=None) -> None:
    """Start the run in its own process group; SIGKILL the whole group (torchrun and its
    workers) as soon as ``when(out)`` holds."""
    proc = subprocess.Popen(
        _cmd(variant, overrides),
        cwd=cwd,
        env={**tune_env(), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    try:
        while not when(out):
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before the kill: {proc.stderr.read()[-4000:]}")
            assert time.monotonic() < deadline, "no kill point within 600 s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def _listed(step: int):
    """Kill once checkpoints.json lists a checkpoint at ``step`` or later."""

    def when(out: Path) -> bool:
        return any(e["global_step"] >= step for e in read_checkpoints(out))

    return when


def _final_files(variant: str) -> List[str]:
    names = VARIANTS[variant][3]
    if names is None:  # distributed: as its single-device twin
        names = VARIANTS[variant.replace("_2ranks", "")][3]
    return [f"epoch_2{'/' if n[0] != '_' else ''}{n}" for n in names]


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    """Each variant's uninterrupted run, made on first use: output_dir -> its folder."""
    runs = {}

    def get(variant: str) -> Path:
        if variant not in runs:
            out = tmp_path_factory.mktemp(f"straight_{variant}")
            _run(variant, _overrides(assets, variant, out), cwd=out)
            runs[variant] = out
        return runs[variant]

    return get


def _resume_and_compare(variant, assets, straight_out: Path, out: Path, cwd: Path) -> int:
    """Resume ``out`` with the one switch; its losses after the resumed step and its final
    weights must be the uninterrupted run's. Returns the step resumed from."""
    latest = read_checkpoints(out)[-1]
    assert latest["final"] is False
    log_dir = cwd / "resumed_log"
    overrides = _overrides(assets, variant, out) + [
        "resume_from_checkpoint=True",
        f"metric_logger.log_dir={log_dir}",
    ]
    _run(variant, overrides, cwd=cwd)
    start = latest["global_step"]
    assert [r["step"] for r in read_disk_log(log_dir)] == list(range(start + 1, 11))
    expected = logged_losses(straight_out)[start:]
    # Bit for bit on one device; 1e-6 on two ranks (as the other distributed resume tests).
    atol = 1e-6 if variant.endswith("2ranks") else 0.0
    torch.testing.assert_close(logged_losses(log_dir), expected, rtol=0, atol=atol)
    lrs = [r["lr"] for r in read_disk_log(straight_out)][start:]
    assert [r["lr"] for r in read_disk_log(log_dir)] == lrs
    for name in _final_files(variant):
        a, b = load_file(straight_out / name), load_file(out / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=f"{name}: {k}")
    return start


def _check_pruned_layout(out: Path, variant: str) -> None:
    entries = read_checkpoints(out)
    # keep_last_n_checkpoints=2: step_2 and step_4 pruned, the epoch checkpoints kept.
    assert [e["name"] for e in entries] == ["epoch_1", "step_6", "step_8", "epoch_2"]
    assert [e["final"] for e in entries] == [False, False, False, True]
    assert [(e["epochs_run"], e["steps_in_epoch"]) for e in entries] == [
        (1, 0),
        (1, 1),
        (1, 3),
        (2, 0),
    ]
    lora = variant.startswith("lora")
    expected = {"checkpoints.json"}
    for name in ("epoch_1", "step_6", "step_8", "epoch_2"):
        expected |= {name} | ({f"{name}_adapter", f"{name}_peft"} if lora else set())
        expected |= {f"{name}_state"} if name != "epoch_2" else set()
    assert {p.name for p in out.iterdir() if not p.name.endswith(".jsonl")} == expected
    assert sorted(p.name for p in (out / "step_6").glob("*.safetensors")) == ["model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kill_at_a_step_then_resume_matches_the_uninterrupted_run(
    variant, assets, straight, tmp_path
):
    straight_out = straight(variant)
    _check_pruned_layout(straight_out, variant)
    rows = read_disk_log(straight_out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(r["tokens_per_second"] > 0 for r in rows)
    kill_step = random.Random(variant).choice([2, 4, 6])
    out = tmp_path / "killed"
    _run_and_kill(variant, _overrides(assets, variant, out), tmp_path, out, _listed(kill_step))
    start = _resume_and_compare(variant, assets, straight_out, out, tmp_path)
    print(f"{variant}: killed after step_{kill_step} was listed, resumed from step {start}")
    _check_pruned_layout(out, variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora_2ranks"])
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(
    variant, assets, straight, tmp_path
):
    """TORCHTUNE_TEST_WRITE_DELAY slows each staged file: the kill lands while step_4's files
    are being written, so checkpoints.json still ends at step_2, and that one resumes."""
    out = tmp_path / "killed"

    def writing_step_4(out: Path) -> bool:
        return bool(list(out.glob("step_4*/*.tmp")))

    env = {"TORCHTUNE_TEST_WRITE_DELAY": "1.5"}
    _run_and_kill(variant, _overrides(assets, variant, out), tmp_path, out, writing_step_4, env)
    assert [e["name"] for e in read_checkpoints(out)] == ["step_2"]
    assert _resume_and_compare(variant, assets, straight(variant), out, tmp_path) == 2


def _unfinished_copy(run: Path, dest: Path) -> Path:
    """A copy of a finished run whose checkpoints.json stops at step_8 (as if killed)."""
    shutil.copytree(run, dest)
    index = json.loads((dest / "checkpoints.json").read_text())
    index["checkpoints"] = index["checkpoints"][:-1]
    (dest / "checkpoints.json").write_text(json.dumps(index))
    return dest


@pytest.mark.slow
def test_resume_with_other_batches_is_refused(assets, straight, tmp_path):
    from torchtune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice

    out = _unfinished_copy(straight("full"), tmp_path / "run")
    base = _overrides(assets, "full", out) + ["resume_from_checkpoint=True"]
    cfg_path = get_config("tiny/full").file_path
    cases = {
        "batch_size=4": r"world_size x batch_size: the checkpoint has 1 x 2, this run 1 x 4",
        "gradient_accumulation_steps=1": r"gradient_accumulation_steps: the checkpoint has 2, "
        r"this run 1",
        "dataset.max_seq_len=64": r"dataset: the checkpoint's has 40 samples and config hash "
        r"\w{12}, this run's 40 and \w{12}",
    }
    for override, message in cases.items():
        cfg = config.load_config(cfg_path, base + [override])
        recipe = FullFinetuneRecipeSingleDevice(cfg)
        with pytest.raises(ValueError, match=message):
            recipe.setup(cfg)
    # Two ranks of the same per-rank batch: twice the global batch.
    cmd = _cmd("full_2ranks", tiny_overrides(assets, out) + COMMON + FULL + ["batch_size=2"])
    proc = subprocess.run(
        [*cmd, "resume_from_checkpoint=True"],
        cwd=tmp_path,
        env=tune_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "world_size x batch_size: the checkpoint has 1 x 2, this run 2 x 2" in proc.stderr
    assert [e["name"] for e in read_checkpoints(out)][-1] == "step_8"  # nothing written


@pytest.mark.slow
def test_max_steps_ends_mid_epoch_and_a_finished_run_resumes_to_nothing(assets, straight, tmp_path):
    out = tmp_path / "run"
    overrides = _overrides(assets, "lora", out) + ["max_steps=7"]
    _run("lora", overrides, cwd=tmp_path)
    rows = read_disk_log(out)
    assert [r["step"] for r in rows] == list(range(1, 8))
    # The schedule is 7 steps long: warm-up 2, then cosine to 0 at step 7.
    lr = 3e-3
    want = [
        lr * t / 2 if t < 2 else lr * 0.5 * (1 + math.cos(math.pi * (t - 2) / 5)) for t in range(7)
    ]
    torch.testing.assert_close(
        torch.tensor([r["lr"] for r in rows]), torch.tensor(want), rtol=1e-6, atol=0
    )
    # Same data and draws as the 10-step run until the lr schedules part.
    straight_losses = logged_losses(straight("lora"))
    assert logged_losses(out)[0].item() == straight_losses[0].item()
    entries = read_checkpoints(out)
    assert [e["name"] for e in entries] == ["epoch_1", "step_6", "step_7"]
    assert entries[-1]["final"] and entries[-1]["files"]["recipe_state"] is None
    assert (out / "step_7_peft" / "adapter_config.json").is_file()
    # Resuming a finished run says so and trains nothing.
    log_dir = tmp_path / "again"
    cmd = _cmd(
        "lora", overrides + ["resume_from_checkpoint=True", f"metric_logger.log_dir={log_dir}"]
    )
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "is finished (its latest checkpoint step_7 is final): nothing to do" in proc.stderr
    assert not [line for f in log_dir.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [e["name"] for e in read_checkpoints(out)] == ["epoch_1", "step_6", "step_7"]
