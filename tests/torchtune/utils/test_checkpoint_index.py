# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""checkpoints.json: the commit point, pruning, resume by one switch, a kill mid-write."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.torchtune.utils.checkpoint_fixtures import tiny_hf, write_hf_checkpoint
from torchtune.utils import FullModelHFCheckpointer
from torchtune.utils._checkpointing import _io
from torchtune.utils._checkpointing._index import (
    checkpoint_paths,
    latest_checkpoint,
    read_checkpoints,
    record_checkpoint,
)


def _entry(name, final=False):
    return {"name": name, "final": final, "files": {"model": name}}


def _make_folders(out: Path, name: str) -> None:
    for suffix in ("", "_adapter", "_peft", "_state"):
        (out / f"{name}{suffix}").mkdir(parents=True)
        (out / f"{name}{suffix}" / "f").write_text("x")


def test_keep_last_n_prunes_old_step_checkpoints_only(tmp_path):
    names = ["step_2", "step_4", "epoch_1", "step_6", "step_8"]
    pruned = []
    for name in names:
        _make_folders(tmp_path, name)
        pruned.append(record_checkpoint(tmp_path, _entry(name), keep_last_n=2))
    # Two step checkpoints are kept, the newest included; the epoch checkpoint never goes.
    assert pruned == [[], [], [], ["step_2"], ["step_4"]]
    assert [e["name"] for e in read_checkpoints(tmp_path)] == ["epoch_1", "step_6", "step_8"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        f"{n}{s}"
        for n in ("epoch_1", "step_6", "step_8")
        for s in ("", "_adapter", "_peft", "_state")
    )
    # keep_last_n=1 and an epoch checkpoint as the newest: the older step ones all go.
    _make_folders(tmp_path, "epoch_2")
    assert record_checkpoint(tmp_path, _entry("epoch_2", final=True), keep_last_n=1) == ["step_6"]
    assert [e["name"] for e in read_checkpoints(tmp_path)] == ["epoch_1", "step_8", "epoch_2"]
    assert latest_checkpoint(tmp_path)["final"] is True
    assert not list(tmp_path.glob("*.tmp"))


def test_no_index_means_no_complete_checkpoint(tmp_path):
    assert read_checkpoints(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="no 'checkpoints' list"):
        read_checkpoints(tmp_path)


def _full_state(sd, step):
    return {
        "model": {k: v + step for k, v in sd.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "global_step": step,
        "epochs_run": 0,
        "steps_in_epoch": step,
        "rng_state": torch.get_rng_state(),
    }


def test_resume_switch_reads_the_latest_complete_checkpoint(tmp_path):
    names = write_hf_checkpoint(tmp_path / "in", tiny_hf())
    ckpt = FullModelHFCheckpointer(tmp_path / "in", names, "LLAMA2", tmp_path / "out")
    sd = ckpt.load_checkpoint()["model"]
    for step in (2, 4):
        ckpt.save_checkpoint(
            _full_state(sd, step), intermediate_checkpoint=True, name=f"step_{step}"
        )
    paths = checkpoint_paths(tmp_path / "out", "step_4")
    assert paths.model_dir.is_dir() and paths.recipe_state.is_file()
    assert not paths.adapter_file.exists() and not paths.peft_dir.exists()
    entry = latest_checkpoint(tmp_path / "out")
    assert entry["name"] == "step_4" and entry["global_step"] == 4 and entry["final"] is False
    # One switch: the model comes from step_4/ (the original folder is ignored), with its state.
    resumed = FullModelHFCheckpointer(
        tmp_path / "in", names, "LLAMA2", tmp_path / "out", resume_from_checkpoint=True
    )
    got = resumed.load_checkpoint()
    assert got["global_step"] == 4 and got["steps_in_epoch"] == 4
    for k in sd:
        assert torch.equal(got["model"][k], sd[k] + 4), k
    # A final checkpoint: nothing to resume, the loaded state says so.
    ckpt.save_checkpoint({"model": {k: v + 9 for k, v in sd.items()}}, epoch=1)
    again = FullModelHFCheckpointer(
        tmp_path / "in", names, "LLAMA2", tmp_path / "out", resume_from_checkpoint=True
    ).load_checkpoint()
    assert again["finished_checkpoint"]["name"] == "epoch_1" and "rng_state" not in again


_KILL_SCRIPT = r"""
import sys, torch
from torchtune.utils import FullModelHFCheckpointer
ckpt = FullModelHFCheckpointer(sys.argv[1], ["model.safetensors"], "LLAMA2", sys.argv[2])
sd = ckpt.load_checkpoint()["model"]
state = {"model": {k: v + 1 for k, v in sd.items()}, "global_step": 4, "rng_state": torch.get_rng_state()}
print("writing", flush=True)
ckpt.save_checkpoint(state, intermediate_checkpoint=True, name="step_4")
"""


def _staged_one(out: Path) -> bool:
    return bool(list(out.glob("step_4*/*.tmp")))


def _renamed_one(out: Path) -> bool:  # the commit's first rename done, others pending
    return (out / "step_4" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("killed_when", [_staged_one, _renamed_one], ids=["staging", "committing"])
def test_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path, killed_when):
    """SIGKILL while step_4 is being written (TORCHTUNE_TEST_WRITE_DELAY slows each file):
    checkpoints.json still ends at step_2, whose files are whole and resume."""
    names = write_hf_checkpoint(tmp_path / "in", tiny_hf())
    assert names == ["model.safetensors"]
    out = tmp_path / "out"
    ckpt = FullModelHFCheckpointer(tmp_path / "in", names, "LLAMA2", out)
    sd = ckpt.load_checkpoint()["model"]
    ckpt.save_checkpoint(_full_state(sd, 2), intermediate_checkpoint=True, name="step_2")
    env = dict(os.environ, TORCHTUNE_TEST_WRITE_DELAY="2")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "in"), str(out)], env=env
    )
    try:
        # Each staged file and each rename is followed by a 2 s sleep.
        deadline = time.monotonic() + 120
        while not killed_when(out):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert [e["name"] for e in read_checkpoints(out)] == ["step_2"]
    resumed = FullModelHFCheckpointer(
        tmp_path / "in", names, "LLAMA2", out, resume_from_checkpoint=True
    ).load_checkpoint()
    assert resumed["global_step"] == 2
    for k in sd:
        assert torch.equal(resumed["model"][k], sd[k] + 2), k
    assert (
        load_file(out / "step_2" / "model.safetensors").keys()
        == load_file(tmp_path / "in" / "model.safetensors").keys()
    )
    # The next write of step_4 replaces the stale .tmp files and commits.
    ckpt.save_checkpoint(_full_state(sd, 4), intermediate_checkpoint=True, name="step_4")
    assert [e["name"] for e in read_checkpoints(out)] == ["step_2", "step_4"]
    assert not list(out.glob("step_4*/*.tmp"))
    assert json.loads((out / "checkpoints.json").read_text())["version"] == 1
    assert _io._TEST_DELAY_ENV == "TORCHTUNE_TEST_WRITE_DELAY"
