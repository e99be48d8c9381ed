# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune --nproc_per_node 2 full_finetune_distributed`` on CPU (gloo) against the single-device
recipe with the same global batch; resume, a two-node launch and a failing rank."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from tests.recipes.single_device_utils import (
    build_tiny_assets,
    logged_losses,
    read_disk_log,
    run_tune,
    tiny_overrides,
)
from torchtune import config
from torchtune._recipe_registry import get_config
from torchtune.config._resolvers import PACKAGE_DIR
from torchtune.datasets import alpaca_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = "full_finetune_distributed"
# 40 samples: per rank 20, in batches of 2, 2 micro-batches a step -> 5 steps an epoch; the
# single-device twin takes batches of 4. Shuffled, so each rank's batches mix lengths.
COMMON = [
    "shuffle=True",
    "seed=5",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=5",
    "optimizer.lr=2e-4",
    "optimizer.weight_decay=0.01",
    "clip_grad_norm=1.0",
    "dtype=fp32",
]
PER_RANK_BATCH, WORLD_SIZE = 2, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tune_cmd(launcher: Sequence[str], recipe: str, config_name: str, overrides: Sequence[str]):
    tune = Path(sys.executable).parent / "tune"
    return [str(tune), *launcher, recipe, "--config", config_name, *overrides]


def tune_env() -> dict:
    # Workers import test-only dataset components from this repository's tests package.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_tune_distributed(
    recipe: str,
    config_name: str,
    overrides: Sequence[str],
    cwd: Path,
    launcher: Optional[List[str]] = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``tune --nnodes 1 --nproc_per_node 2 <recipe> ...``; fail with its output."""
    launcher = launcher or ["--nnodes", "1", "--nproc_per_node", str(WORLD_SIZE)]
    if "--rdzv_endpoint" not in launcher:  # not the fixed default 29500: tests run in parallel
        launcher = [*launcher, "--master_port", str(free_port())]
    cmd = tune_cmd(launcher, recipe, config_name, overrides)
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=tune_env()
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def assert_same_weights(a_file: Path, b_file: Path, atol: float) -> None:
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)


def resume_overrides(run_dir: Path, output_dir: Path) -> List[str]:
    return [
        f"checkpointer.checkpoint_dir={run_dir / 'epoch_1'}",
        f"checkpointer.recipe_checkpoint={run_dir / 'epoch_1_state' / 'recipe_state.pt'}",
        "resume_from_checkpoint=True",
        f"output_dir={output_dir}",
    ]


class _FailOnRank(Dataset):
    def __init__(self, ds: Dataset, fail_rank: int, fail_after: int, mark_file: str) -> None:
        self._ds, self._fail_rank, self._fail_after, self._calls = ds, fail_rank, fail_after, 0
        self._mark_file = mark_file

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int):
        self._calls += 1
        if os.environ.get("RANK") == str(self._fail_rank) and self._calls > self._fail_after:
            if self._mark_file:
                Path(self._mark_file).write_text(str(time.time()))
            raise RuntimeError(f"injected failure after {self._fail_after} samples")
        return self._ds[i]


def alpaca_failing_on_rank(
    tokenizer, *, fail_rank: int = 1, fail_after: int = 6, mark_file: str = "", **kwargs
):
    """``alpaca_dataset`` whose samples raise on rank ``fail_rank`` after ``fail_after``
    (writing the time of the failure to ``mark_file`` when given)."""
    return _FailOnRank(alpaca_dataset(tokenizer, **kwargs), fail_rank, fail_after, mark_file)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("full_dist_assets"))


@pytest.fixture(scope="module")
def single_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_single")
    overrides = tiny_overrides(assets, out) + COMMON + [f"batch_size={PER_RANK_BATCH * WORLD_SIZE}"]
    run_tune("full_finetune_single_device", "tiny/full", overrides, cwd=out)
    return out


@pytest.fixture(scope="module")
def dist_run(assets, tmp_path_factory):
    """Two epochs of five steps on two processes; returns (output_dir, overrides, seconds)."""
    out = tmp_path_factory.mktemp("full_dist")
    overrides = tiny_overrides(assets, out) + COMMON + [f"batch_size={PER_RANK_BATCH}"]
    t0 = time.perf_counter()
    run_tune_distributed(RECIPE, "tiny/full_distributed", overrides, cwd=out)
    return out, overrides, time.perf_counter() - t0


def test_ranks_see_uneven_token_counts(assets, tmp_path):
    """Precondition of the parity test: the two ranks score different numbers of tokens in
    a step, so a mean of per-rank means would differ from the global token mean."""
    from torch.utils.data import DistributedSampler

    overrides = tiny_overrides(assets, tmp_path) + COMMON
    cfg = config.load_config(get_config("tiny/full_distributed").file_path, overrides)
    ds = config.instantiate(cfg.dataset, tokenizer=config.instantiate(cfg.tokenizer))
    counts = []
    for rank in range(WORLD_SIZE):
        sampler = DistributedSampler(ds, num_replicas=WORLD_SIZE, rank=rank, shuffle=True, seed=5)
        idx = list(sampler)[: PER_RANK_BATCH * 2]  # the first step's two micro-batches
        counts.append(sum(sum(lab != -100 for lab in ds[i]["labels"][1:]) for i in idx))
    assert counts[0] != counts[1], counts


def test_two_processes_match_single_device(dist_run, single_run):
    out, _, seconds = dist_run
    ours, expected = logged_losses(out), logged_losses(single_run)
    assert len(ours) == 10
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    for epoch in (1, 2):
        name = f"epoch_{epoch}/model.safetensors"
        assert_same_weights(single_run / name, out / name, atol=1e-5)
    # Rank 0 alone logs: one file, one row per step, the single-device columns.
    rows = read_disk_log(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    columns = {"step", "loss", "lr", "tokens_per_second", "peak_memory_gib"}
    assert all(set(r) == columns for r in rows)
    assert all(r["tokens_per_second"] > 0 for r in rows)
    assert (out / "epoch_1_state" / "recipe_state.pt").is_file()
    assert not (out / "epoch_2_state" / "recipe_state.pt").exists()
    # recipe_state.pt as the single-device recipe writes it (optimizer state keyed by index).
    state = torch.load(out / "epoch_1_state" / "recipe_state.pt", weights_only=True)
    single = torch.load(single_run / "epoch_1_state" / "recipe_state.pt", weights_only=True)
    # Plus each rank's RNG states (ranks draw differently; one device has one).
    assert state.keys() - {"rank_rng_states"} == single.keys()
    assert len(state["rank_rng_states"]) == WORLD_SIZE
    keys = ("epochs_run", "global_step", "seed", "total_epochs", "max_steps_per_epoch")
    for key in (*keys, "steps_in_epoch"):
        assert state[key] == single[key], key
    assert state["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]
    assert state["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()
    for i, moments in single["optimizer"]["state"].items():
        for key, value in moments.items():
            got = state["optimizer"]["state"][i][key]
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-7, msg=f"{i}.{key}")
    print(f"2-process run: {seconds:.1f}s, max |loss diff| {(ours - expected).abs().max():.2e}")


@pytest.mark.slow
def test_resume_gives_identical_second_epoch(dist_run, tmp_path):
    out, overrides, _ = dist_run
    resumed = tmp_path / "resumed"
    run_tune_distributed(
        RECIPE, "tiny/full_distributed", overrides + resume_overrides(out, resumed), cwd=tmp_path
    )
    torch.testing.assert_close(logged_losses(resumed), logged_losses(out)[5:], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_disk_log(resumed)] == list(range(6, 11))
    name = "epoch_2/model.safetensors"
    assert_same_weights(out / name, resumed / name, atol=1e-6)


@pytest.mark.slow
def test_resumes_a_single_device_run(dist_run, single_run, tmp_path):
    """Both recipes write recipe_state.pt in one layout: a run started on one device goes on
    on two processes with the same numbers."""
    _, overrides, _ = dist_run
    resumed = tmp_path / "resumed"
    run_tune_distributed(
        RECIPE,
        "tiny/full_distributed",
        overrides + resume_overrides(single_run, resumed),
        cwd=tmp_path,
    )
    expected = logged_losses(single_run)[5:]
    torch.testing.assert_close(logged_losses(resumed), expected, rtol=0, atol=1e-4)
    name = "epoch_2/model.safetensors"
    assert_same_weights(single_run / name, resumed / name, atol=1e-5)


@pytest.mark.slow
def test_two_node_launch_on_one_machine(dist_run, tmp_path):
    """Two `tune` processes, one worker each, meeting through c10d rendezvous: the same
    world of two ranks as --nproc_per_node 2, so the same numbers."""
    out, overrides, _ = dist_run
    node_out = tmp_path / "two_nodes"
    launcher = [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv_id",
        "tt_two_nodes",
    ]
    overrides = overrides + [f"output_dir={node_out}", "epochs=1"]
    cmd = tune_cmd(launcher, RECIPE, "tiny/full_distributed", overrides)
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=tune_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stdout[-3000:] + stderr[-6000:]
    torch.testing.assert_close(logged_losses(node_out), logged_losses(out)[:5], rtol=0, atol=1e-6)
    assert (node_out / "epoch_1" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_quickly(assets, tmp_path):
    overrides = (
        tiny_overrides(assets, tmp_path)
        + COMMON
        + [
            f"batch_size={PER_RANK_BATCH}",
            f"dataset._component_={__name__}.alpaca_failing_on_rank",
            "dataset.fail_rank=1",
            "dataset.fail_after=6",  # in the second step: rank 0 is then waiting in a collective
            f"dataset.mark_file={tmp_path / 'failed_at'}",
        ]
    )
    cmd = tune_cmd(
        ["--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(free_port())],
        RECIPE,
        "tiny/full_distributed",
        overrides,
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=tune_env()
    )
    elapsed = time.perf_counter() - t0
    teardown = time.time() - float((tmp_path / "failed_at").read_text())
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f}s"
    assert teardown < 30, f"the job ended {teardown:.0f}s after rank 1 failed"
    output = proc.stdout + proc.stderr
    assert "rank 1: RuntimeError: injected failure after 6 samples" in output, output[-6000:]
    assert not (tmp_path / "epoch_1").exists()
    print(f"failing rank: exit {proc.returncode} in {elapsed:.1f}s, {teardown:.1f}s after failing")


@pytest.mark.slow
def test_activation_checkpointing_and_bf16(dist_run, tmp_path):
    """Activation checkpointing changes nothing but memory; bf16 compute (fp32 masters and
    reduction) tracks fp32 and writes bf16 checkpoints, as the single-device recipe does."""
    out, overrides, _ = dist_run
    one_epoch = overrides + ["epochs=1"]
    run_tune_distributed(
        RECIPE,
        "tiny/full_distributed",
        one_epoch + ["enable_activation_checkpointing=True", f"output_dir={tmp_path / 'ac'}"],
        cwd=tmp_path,
    )
    ac = logged_losses(tmp_path / "ac")
    torch.testing.assert_close(ac, logged_losses(out)[:5], rtol=0, atol=1e-6)
    run_tune_distributed(
        RECIPE,
        "tiny/full_distributed",
        one_epoch + ["dtype=bf16", f"output_dir={tmp_path / 'bf16'}"],
        cwd=tmp_path,
    )
    bf16, fp32 = logged_losses(tmp_path / "bf16"), logged_losses(out)[:5]
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16[0], fp32[0], rtol=2e-2, atol=0)
    saved = load_file(tmp_path / "bf16" / "epoch_1" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in saved.values())


@pytest.mark.gpu
def test_nccl_bf16_on_one_gpu(assets, tmp_path):
    overrides = (
        tiny_overrides(assets, tmp_path)
        + COMMON
        + [
            "batch_size=4",
            "epochs=1",
            "device=cuda",
            "dtype=bf16",
            "enable_activation_checkpointing=True",
        ]
    )
    run_tune_distributed(
        RECIPE,
        "tiny/full_distributed",
        overrides,
        cwd=tmp_path,
        launcher=["--nnodes", "1", "--nproc_per_node", "1"],
    )
    losses = logged_losses(tmp_path)
    assert len(losses) == 5 and torch.isfinite(losses).all()
    assert losses[-1] < losses[0]
    rows = read_disk_log(tmp_path)
    assert all(r["peak_memory_gib"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(
    not (PACKAGE_DIR / "assets" / "tiny" / "model" / "model.safetensors").is_file(),
    reason="the tiny model is not bundled yet (scripts/make_tiny_assets.py)",
)
@pytest.mark.parametrize(
    "recipe, config_name, single_recipe, single_config",
    [
        (RECIPE, "tiny/full_distributed", "full_finetune_single_device", "tiny/full"),
        (
            "lora_finetune_distributed",
            "tiny/lora_distributed",
            "lora_finetune_single_device",
            "tiny/lora",
        ),
    ],
)
def test_tiny_configs_as_shipped_give_the_single_device_numbers(
    recipe, config_name, single_recipe, single_config, tmp_path
):
    """The shipped tiny configs, on the bundled assets, launched as their first line says:
    the same first step as their single-device twins (later LoRA steps differ only by the
    fresh adapters' draw, see the LoRA recipe)."""
    steps = ["max_steps_per_epoch=3"]
    run_tune_distributed(recipe, config_name, [*steps, f"output_dir={tmp_path / 'd'}"], tmp_path)
    run_tune(single_recipe, single_config, [*steps, f"output_dir={tmp_path / 's'}"], tmp_path)
    ours, expected = logged_losses(tmp_path / "d"), logged_losses(tmp_path / "s")
    assert len(ours) == 3
    torch.testing.assert_close(ours[0], expected[0], rtol=0, atol=1e-4)
    if recipe == RECIPE:
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
