# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""End-to-end tests of ``tune full_finetune_single_device`` on a tiny model, on CPU."""

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.single_device_utils import (
    build_tiny_assets,
    hf_reference_losses,
    load_hf_model,
    logged_losses,
    read_disk_log,
    run_tune,
    tiny_overrides,
)
from torchtune import config, training
from torchtune._recipe_registry import get_config
from torchtune.config._resolvers import PACKAGE_DIR

RECIPE = "full_finetune_single_device"
# 40 samples, batches of 2, 2 micro-batches per step: 10 batches -> 5 optimizer steps an epoch.
RUN_OVERRIDES = [
    "shuffle=False",
    "batch_size=2",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=5",
    "optimizer.lr=2e-4",
    "optimizer.weight_decay=0.01",
    "dtype=fp32",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("full_assets"))


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    """Two epochs of five steps; returns (output_dir, overrides)."""
    out = tmp_path_factory.mktemp("full_run")
    overrides = tiny_overrides(assets, out) + RUN_OVERRIDES
    run_tune(RECIPE, "tiny/full", overrides, cwd=out)
    return out, overrides


def test_losses_match_hf_training_loop(full_run, assets):
    out, overrides = full_run
    cfg = config.load_config(get_config("tiny/full").file_path, overrides)
    hf = load_hf_model(assets.model_dir)
    opt = torch.optim.AdamW(hf.parameters(), lr=2e-4, weight_decay=0.01)
    expected = hf_reference_losses(hf, opt, cfg, steps_per_epoch=5)
    ours = logged_losses(out)
    assert len(ours) == 10
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    # The weights the recipe saved after the last epoch are the reference's trained weights.
    saved = load_file(out / "epoch_2" / "model.safetensors")
    for name, param in hf.state_dict().items():
        torch.testing.assert_close(saved[name], param, rtol=0, atol=1e-4, msg=name)


def test_log_rows_and_checkpoints(full_run):
    out, _ = full_run
    rows = read_disk_log(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for row in rows:
        assert set(row) == {"step", "loss", "lr", "tokens_per_second", "peak_memory_gib"}
        assert row["lr"] == pytest.approx(2e-4)  # constant lr: lr_scheduler is null
        assert row["tokens_per_second"] > 0 and row["peak_memory_gib"] > 0
    # Intermediate checkpoint after epoch 0 carries the recipe state; the last one does not.
    assert (out / "epoch_1_state" / "recipe_state.pt").is_file()
    assert not (out / "epoch_2_state" / "recipe_state.pt").exists()
    assert (out / "epoch_2" / "config.json").is_file()


@pytest.mark.slow
def test_resume_gives_identical_second_epoch(full_run, assets, tmp_path):
    out, overrides = full_run
    resumed = tmp_path / "resumed"
    run_tune(
        RECIPE,
        "tiny/full",
        overrides
        + [
            f"checkpointer.checkpoint_dir={out / 'epoch_1'}",
            f"checkpointer.recipe_checkpoint={out / 'epoch_1_state' / 'recipe_state.pt'}",
            "resume_from_checkpoint=True",
            f"output_dir={resumed}",
        ],
        cwd=tmp_path,
    )
    straight = logged_losses(out)
    torch.testing.assert_close(logged_losses(resumed), straight[5:], rtol=0, atol=0)
    assert [r["step"] for r in read_disk_log(resumed)] == list(range(6, 11))
    a = load_file(out / "epoch_2" / "model.safetensors")
    b = load_file(resumed / "epoch_2" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_shuffled_resume_and_activation_checkpointing(assets, tmp_path):
    """With shuffling, the resumed second epoch sees the same order; activation
    checkpointing changes nothing but memory."""
    base = tiny_overrides(assets, tmp_path / "a") + RUN_OVERRIDES + ["shuffle=True", "seed=7"]
    run_tune(RECIPE, "tiny/full", base, cwd=tmp_path)
    run_tune(
        RECIPE,
        "tiny/full",
        base
        + [
            f"checkpointer.checkpoint_dir={tmp_path / 'a' / 'epoch_1'}",
            f"checkpointer.recipe_checkpoint={tmp_path / 'a' / 'epoch_1_state' / 'recipe_state.pt'}",
            "resume_from_checkpoint=True",
            "enable_activation_checkpointing=True",
            f"output_dir={tmp_path / 'b'}",
        ],
        cwd=tmp_path,
    )
    straight = logged_losses(tmp_path / "a")
    torch.testing.assert_close(logged_losses(tmp_path / "b"), straight[5:], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_bf16_run_tracks_fp32(full_run, assets, tmp_path):
    _, overrides = full_run
    run_tune(
        RECIPE,
        "tiny/full",
        overrides + ["dtype=bf16", "epochs=1", f"output_dir={tmp_path}"],
        cwd=tmp_path,
    )
    fp32 = logged_losses(full_run[0])[:5]
    bf16 = logged_losses(tmp_path)
    assert torch.isfinite(bf16).all()
    # bf16 has 8 mantissa bits: the first step (same weights, same data) agrees to ~1%.
    torch.testing.assert_close(bf16[0], fp32[0], rtol=2e-2, atol=0)
    saved = load_file(tmp_path / "epoch_1" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in saved.values())


def test_packed_batches_score_like_their_samples_alone(assets, tmp_path):
    """The recipe hands a packed batch's mask and input_pos to the model: the summed loss of a
    packed row equals the sum over its samples run one by one."""
    from torchtune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice

    overrides = tiny_overrides(assets, tmp_path) + [
        "shuffle=False",
        "batch_size=2",
        "dataset.packed=True",
        "dataset.train_on_input=True",
        "dataset.max_seq_len=512",
        "model.max_seq_len=512",
    ]
    cfg = config.load_config(get_config("tiny/full").file_path, overrides)
    recipe = FullFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    batch = next(iter(recipe._dataloader))
    assert {"mask", "input_pos"} <= set(batch)
    with torch.no_grad():
        loss_sum, num_tokens = training.next_token_loss_sum(
            recipe._model, recipe._loss_fn, batch, torch.device("cpu")
        )
        expected_sum, expected_tokens = torch.zeros((), dtype=torch.float64), 0
        max_segments = 0
        for tokens, labels, pos in zip(batch["tokens"], batch["labels"], batch["input_pos"]):
            starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
            max_segments = max(max_segments, len(starts) - 1)
            for a, b in zip(starts[:-1], starts[1:]):
                logits = recipe._model(tokens[None, a:b])[0]
                seg_labels = labels[a + 1 : b]
                expected_tokens += int((seg_labels != -100).sum())
                if b - a > 1:
                    expected_sum += torch.nn.functional.cross_entropy(
                        logits[:-1], seg_labels, reduction="sum"
                    ).double()
    assert max_segments >= 3  # really packed: several samples (+ padding) in a row
    assert int(num_tokens) == expected_tokens
    torch.testing.assert_close(loss_sum.double(), expected_sum, rtol=1e-6, atol=1e-4)
    recipe.cleanup()


def test_gradient_accumulation_equals_the_big_batch(assets, tmp_path):
    """Two micro-batches of 2 give the same SGD update as one batch of 4 (SGD, unlike Adam's
    first step, is sensitive to the gradient's scale, so a mis-normalised loss would show)."""
    from torchtune.data import padded_collate
    from torchtune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice

    overrides = tiny_overrides(assets, tmp_path) + [
        "shuffle=False",
        "batch_size=2",
        "optimizer._component_=torch.optim.SGD",
        "optimizer.lr=0.5",
        "optimizer.weight_decay=0.0",
        "dataset.max_seq_len=256",
    ]
    cfg = config.load_config(get_config("tiny/full").file_path, overrides)
    small, big = FullFinetuneRecipeSingleDevice(cfg), FullFinetuneRecipeSingleDevice(cfg)
    small.setup(cfg)
    big.setup(cfg)
    ds = small._dataloader.dataset
    samples = [ds[i] for i in range(4)]
    micro = [padded_collate(samples[:2]), padded_collate(samples[2:])]
    assert micro[0]["tokens"].shape[1] != micro[1]["tokens"].shape[1]  # different padding

    def step(recipe, micro_batches):  # the recipe's step, with the recipe's parts
        loss, _ = training.optimizer_step(
            recipe._model,
            recipe._loss_fn,
            recipe._optimizer,
            micro_batches,
            params=recipe._model.parameters(),
            device=torch.device("cpu"),
            lr_scheduler=recipe._lr_scheduler,
        )
        return loss

    loss_small = step(small, micro)
    loss_big = step(big, [padded_collate(samples)])
    torch.testing.assert_close(loss_small, loss_big, rtol=1e-6, atol=1e-6)
    before = load_file(assets.model_dir / "model.safetensors")["model.embed_tokens.weight"]
    after_small = small._model.state_dict()
    assert not torch.equal(after_small["tok_embeddings.weight"], before)  # it did train
    for name, param in big._model.state_dict().items():
        torch.testing.assert_close(after_small[name], param, rtol=1e-5, atol=1e-6, msg=name)
    small.cleanup(), big.cleanup()


@pytest.mark.skipif(
    not (PACKAGE_DIR / "assets" / "tiny" / "model" / "model.safetensors").is_file(),
    reason="the tiny model is not bundled yet (scripts/make_tiny_assets.py)",
)
def test_tiny_config_runs_on_bundled_assets(tmp_path):
    run_tune(RECIPE, "tiny/full", [f"output_dir={tmp_path}", "max_steps_per_epoch=3"], cwd=tmp_path)
    losses = logged_losses(tmp_path)
    assert len(losses) == 3 and torch.isfinite(losses).all()
    assert (tmp_path / "epoch_1" / "model.safetensors").is_file()


@pytest.mark.gpu
def test_bf16_on_cuda_with_activation_checkpointing(full_run, tmp_path):
    _, overrides = full_run
    run_tune(
        RECIPE,
        "tiny/full",
        overrides
        + [
            "device=cuda",
            "dtype=bf16",
            "enable_activation_checkpointing=True",
            "epochs=1",
            f"output_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    fp32_cpu = logged_losses(full_run[0])[:5]
    rows = read_disk_log(tmp_path)
    losses = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses[0], fp32_cpu[0], rtol=2e-2, atol=0)
    # CUDA peak memory is max_memory_allocated: small for a tiny model, but not zero.
    assert all(0 < r["peak_memory_gib"] < 1 for r in rows)


@pytest.mark.slow
def test_compile_gives_the_same_losses(full_run, tmp_path):
    """`compile=True` (torch.compile of each decoder layer) trains the same model: the 10
    logged losses agree with the eager run's within 1e-5 (fused kernels reorder float sums)."""
    _, overrides = full_run
    run_tune(
        RECIPE, "tiny/full", overrides + ["compile=True", f"output_dir={tmp_path}"], cwd=tmp_path
    )
    torch.testing.assert_close(
        logged_losses(tmp_path), logged_losses(full_run[0]), rtol=0, atol=1e-5
    )
