# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune --nproc_per_node 2 lora_finetune_distributed`` with QLoRA and QDoRA on CPU (gloo)
against the single-device recipe with the same global batch, from fresh adapters (DoRA's
magnitudes taken from the quantized base on rank 0 and on one device alike)."""

import pytest
import torch

from tests.recipes.single_device_utils import (
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
from tests.recipes.test_lora_finetune_distributed import COMMON, SAVED


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("lora_variant_dist_assets"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [["model.quantize_base=True"], ["model.quantize_base=True", "model.use_dora=True"]],
    ids=["qlora", "qdora"],
)
def test_two_ranks_match_one_device(assets, tmp_path, variant):
    single, dist = tmp_path / "single", tmp_path / "dist"
    single.mkdir(), dist.mkdir()
    run_tune(
        "lora_finetune_single_device",
        "tiny/lora",
        tiny_overrides(assets, single)
        + COMMON
        + [f"batch_size={PER_RANK_BATCH * WORLD_SIZE}"]
        + variant,
        cwd=single,
    )
    run_tune_distributed(
        "lora_finetune_distributed",
        "tiny/lora_distributed",
        tiny_overrides(assets, dist) + COMMON + [f"batch_size={PER_RANK_BATCH}"] + variant,
        cwd=dist,
    )
    ours, expected = logged_losses(dist), logged_losses(single)
    assert len(ours) == 10
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    assert [r["lr"] for r in read_disk_log(dist)] == [r["lr"] for r in read_disk_log(single)]
    for epoch in (1, 2):
        for name in SAVED:  # merged (dequantized) model, our adapter, PEFT's adapter
            path = name.format(f"epoch_{epoch}")
            assert_same_weights(single / path, dist / path, atol=1e-5)
    print(f"{variant}: max |loss diff| {(ours - expected).abs().max():.2e}")
