# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune --nproc_per_node 2 lora_finetune_distributed`` on CPU (gloo) against the single-device
LoRA recipe with the same global batch, from the same starting adapter and from fresh ones
(the same draw on both); resume."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.recipes.single_device_utils import (
    VOCAB_SIZE,
    build_tiny_assets,
    logged_losses,
    read_disk_log,
    run_tune,
    tiny_overrides,
)
from tests.recipes.test_full_finetune_distributed import (
    PER_RANK_BATCH,
    WORLD_SIZE,
    assert_same_weights,
    run_tune_distributed,
)
from torchtune.models.llama2 import lora_llama2
from torchtune.modules.peft import get_adapter_params

RECIPE = "lora_finetune_distributed"
COMMON = [
    "shuffle=True",
    "seed=5",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=5",
    "optimizer.lr=3e-3",
    "optimizer.weight_decay=0.01",
    "lr_scheduler.num_warmup_steps=2",
    "model.lora_rank=4",
    "model.lora_alpha=8",
    "model.lora_attn_modules=[q_proj,k_proj,v_proj]",
    "model.apply_lora_to_mlp=False",
    "model.apply_lora_to_output=False",
    "dtype=fp32",
    "clip_grad_norm=0.05",  # small enough to bite
]
ONE_STEP = ["epochs=1", "max_steps_per_epoch=1"]
# Under output_dir, for checkpoint NAME: merged model, our adapter, PEFT's adapter.
SAVED = [
    "{}/model.safetensors",
    "{}_adapter/adapter.safetensors",
    "{}_peft/adapter_model.safetensors",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dist_assets")
    assets = build_tiny_assets(root)
    # A starting adapter with nonzero B, so loading it (not only A) shows in the losses.
    torch.manual_seed(11)
    model = lora_llama2(
        ["q_proj", "k_proj", "v_proj"],
        vocab_size=VOCAB_SIZE,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        intermediate_dim=88,
        max_seq_len=256,
        lora_rank=4,
        lora_alpha=8,
    )
    adapter = {k: torch.randn_like(v) * 0.02 for k, v in get_adapter_params(model).items()}
    save_file(adapter, root / "start_adapter.safetensors")
    assets.adapter = root / "start_adapter.safetensors"
    return assets


def _overrides(assets, out, per_rank: bool, adapter: bool = True):
    batch = PER_RANK_BATCH if per_rank else PER_RANK_BATCH * WORLD_SIZE
    extra = [f"checkpointer.adapter_checkpoint={assets.adapter}"] if adapter else []
    return tiny_overrides(assets, out) + COMMON + [f"batch_size={batch}"] + extra


@pytest.fixture(scope="module")
def single_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_single")
    run_tune("lora_finetune_single_device", "tiny/lora", _overrides(assets, out, False), cwd=out)
    return out


@pytest.fixture(scope="module")
def dist_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dist")
    overrides = _overrides(assets, out, True)
    run_tune_distributed(RECIPE, "tiny/lora_distributed", overrides, cwd=out)
    return out, overrides


@pytest.mark.slow
def test_two_processes_match_single_device(dist_run, single_run):
    out, _ = dist_run
    ours, expected = logged_losses(out), logged_losses(single_run)
    assert len(ours) == 10
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    # The lr schedule steps the same way.
    assert [r["lr"] for r in read_disk_log(out)] == [r["lr"] for r in read_disk_log(single_run)]
    for epoch in (1, 2):
        for name in SAVED:  # merged model, our adapter, PEFT's adapter
            path = name.format(f"epoch_{epoch}")
            assert_same_weights(single_run / path, out / path, atol=1e-5)
    assert (out / "epoch_2_peft" / "adapter_config.json").read_text() == (
        single_run / "epoch_2_peft" / "adapter_config.json"
    ).read_text()
    print(f"LoRA max |loss diff| {(ours - expected).abs().max():.2e}")


@pytest.mark.slow
def test_fresh_adapters_are_the_same_on_one_device_and_two_ranks(assets, tmp_path):
    """Without an adapter checkpoint both recipes draw the adapter from ``seed`` with
    ``init_lora_adapters`` (B zero: step 1 scores the untouched base model), so a fresh run on
    2 ranks logs the single-device run's per-step losses and saves its adapter; and the
    draw does not depend on the number of ranks: 1 rank x 4 = 2 ranks x 2."""
    three_steps = ["epochs=1", "max_steps_per_epoch=3"]
    run_tune_distributed(
        RECIPE,
        "tiny/lora_distributed",
        _overrides(assets, tmp_path / "d2", True, adapter=False) + three_steps,
        cwd=tmp_path,
    )
    run_tune_distributed(
        RECIPE,
        "tiny/lora_distributed",
        _overrides(assets, tmp_path / "d1", False, adapter=False) + three_steps,
        cwd=tmp_path,
        launcher=["--nnodes", "1", "--nproc_per_node", "1"],
    )
    run_tune(
        "lora_finetune_single_device",
        "tiny/lora",
        _overrides(assets, tmp_path / "s", False, adapter=False) + three_steps,
        cwd=tmp_path,
    )
    two_ranks, one_rank = logged_losses(tmp_path / "d2"), logged_losses(tmp_path / "d1")
    single = logged_losses(tmp_path / "s")
    assert len(two_ranks) == len(single) == 3
    torch.testing.assert_close(two_ranks, one_rank, rtol=0, atol=1e-4)
    torch.testing.assert_close(two_ranks, single, rtol=0, atol=1e-5)
    print(f"fresh LoRA 2 ranks vs 1 device: max |loss diff| {(two_ranks - single).abs().max():.2e}")
    for other in ("d1", "s"):
        assert_same_weights(
            tmp_path / other / "epoch_1_adapter" / "adapter.safetensors",
            tmp_path / "d2" / "epoch_1_adapter" / "adapter.safetensors",
            atol=1e-5,
        )
    adapter = load_file(tmp_path / "d2" / "epoch_1_adapter" / "adapter.safetensors")
    assert set(adapter) == set(load_file(assets.adapter))


@pytest.mark.slow
def test_resume_gives_identical_second_epoch(dist_run, tmp_path):
    out, overrides = dist_run
    resumed = tmp_path / "resumed"
    run_tune_distributed(
        RECIPE,
        "tiny/lora_distributed",
        overrides
        + [
            f"checkpointer.adapter_checkpoint={out / 'epoch_1_adapter' / 'adapter.safetensors'}",
            f"checkpointer.recipe_checkpoint={out / 'epoch_1_state' / 'recipe_state.pt'}",
            "resume_from_checkpoint=True",
            f"output_dir={resumed}",
        ],
        cwd=tmp_path,
    )
    torch.testing.assert_close(logged_losses(resumed), logged_losses(out)[5:], rtol=0, atol=1e-6)
    assert [r["lr"] for r in read_disk_log(resumed)] == [r["lr"] for r in read_disk_log(out)][5:]
    for name in SAVED:
        path = name.format("epoch_2")
        assert_same_weights(out / path, resumed / path, atol=1e-6)


@pytest.mark.gpu
def test_nccl_bf16_on_one_gpu(assets, tmp_path):
    overrides = _overrides(assets, tmp_path, True) + [
        "epochs=1",
        "device=cuda",
        "dtype=bf16",
        "enable_activation_checkpointing=True",
    ]
    run_tune_distributed(
        RECIPE,
        "tiny/lora_distributed",
        overrides,
        cwd=tmp_path,
        launcher=["--nnodes", "1", "--nproc_per_node", "1"],
    )
    losses = logged_losses(tmp_path)
    assert len(losses) == 5 and torch.isfinite(losses).all()
    saved = load_file(tmp_path / "epoch_1_adapter" / "adapter.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
