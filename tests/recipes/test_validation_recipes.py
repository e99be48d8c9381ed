# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Validation in the SFT recipes, end to end on CPU: the logged ``val_loss`` against a plain
per-sample loop on the weights the run saved, training losses unchanged by validation (LoRA
with dropout), 2 ranks against one device, and a bad ``validation_dataset``."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.recipes.single_device_utils import (
    build_tiny_assets,
    logged_losses,
    read_disk_log,
    run_tune,
    tiny_overrides,
)
from tests.test_utils import write_alpaca_json
from torchtune import config
from torchtune._recipe_registry import get_config
from torchtune.models.llama2 import hf_to_tune
from torchtune.recipes.lora_finetune_single_device import LoRAFinetuneRecipeSingleDevice

N_VAL = 9  # not a multiple of world_size * validation_batch_size (2 * 2)
LORA = [
    "model.lora_rank=4",
    "model.lora_alpha=8",
    "model.lora_attn_modules=[q_proj,v_proj]",
    "model.apply_lora_to_mlp=True",
    "model.apply_lora_to_output=False",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_assets")
    assets = build_tiny_assets(root)
    assets.val = write_alpaca_json(root / "val.json", n=N_VAL, seed=7)
    return assets


def _common(assets, out):
    return tiny_overrides(assets, out) + [
        "shuffle=True",
        "batch_size=2",
        "gradient_accumulation_steps=1",
        "dtype=fp32",
        "optimizer.lr=3e-3",
        f"validation_dataset.data_files={assets.val}",
        "validation_batch_size=2",
    ]


def _cfg(name, overrides):
    return config.load_config(get_config(name).file_path, overrides)


def _val_rows(out):
    return {r["step"]: r for r in read_disk_log(out) if "val_loss" in r}


def _plain_val_loss(model, cfg, val_file):
    """One validation sample at a time, full logits, F.cross_entropy: summed / counted."""
    tokenizer = config.instantiate(cfg.tokenizer)
    samples = config.instantiate(cfg.dataset, tokenizer=tokenizer, data_files=str(val_file))
    assert len(samples) == N_VAL
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(len(samples)):
            tokens, labels = samples[i]["tokens"], torch.tensor(samples[i]["labels"][1:])
            logits = model(torch.tensor([tokens]))[0, :-1].double()
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count, count


def _model_from(cfg, model_file, adapter_file=None):
    model = config.instantiate(cfg.model)
    sd = hf_to_tune(load_file(model_file))
    if adapter_file is not None:
        sd.update(load_file(adapter_file))
    model.load_state_dict(sd, strict=True)
    return model


@pytest.fixture(scope="module")
def lora_runs(assets, tmp_path_factory):
    """The same 4-step LoRA run (dropout 0.1) with validation every 2 steps and without."""
    runs = {}
    for name, extra in (
        ("with", ["eval_every_n_steps=2"]),
        ("without", ["validation_dataset=null"]),
    ):
        out = tmp_path_factory.mktemp(f"lora_{name}")
        overrides = (
            _common(assets, out)
            + LORA
            + [
                "model.lora_dropout=0.1",
                "epochs=1",
                "max_steps_per_epoch=4",
                *extra,
            ]
        )
        run_tune("lora_finetune_single_device", "tiny/lora", overrides, cwd=out)
        runs[name] = (out, overrides)
    return runs


@pytest.mark.slow
@pytest.mark.integration
def test_lora_validation_is_the_plain_loss_and_leaves_training_alone(lora_runs, assets):
    (out, overrides), (plain_out, _) = lora_runs["with"], lora_runs["without"]
    # Dropout draws from the RNG every step: any draw validation took would show here.
    ours, without = logged_losses(out), logged_losses(plain_out)
    assert len(ours) == 4
    assert torch.equal(ours, without)
    rows = _val_rows(out)
    assert sorted(rows) == [2, 4] and not _val_rows(plain_out)
    assert all(r["loss"] == ours[r["step"] - 1] for r in rows.values())  # one row per step
    # Step 4's validation ran on the final adapter, the one epoch_1_adapter holds.
    cfg = _cfg("tiny/lora", overrides)
    model = _model_from(
        cfg,
        Path(cfg.checkpointer.checkpoint_dir) / "model.safetensors",
        out / "epoch_1_adapter" / "adapter.safetensors",
    )
    want, count = _plain_val_loss(model, cfg, assets.val)
    assert rows[4]["val_tokens"] == count
    assert rows[4]["val_loss"] == pytest.approx(want, abs=1e-6)
    assert rows[4]["val_perplexity"] == pytest.approx(torch.tensor(want).exp().item(), rel=1e-6)
    assert rows[2]["val_loss"] != rows[4]["val_loss"]  # the adapter trained in between


@pytest.mark.slow
@pytest.mark.integration
def test_full_validates_at_each_epoch_end(assets, tmp_path):
    overrides = _common(assets, tmp_path) + ["epochs=2", "max_steps_per_epoch=2"]
    run_tune("full_finetune_single_device", "tiny/full", overrides, cwd=tmp_path)
    rows = _val_rows(tmp_path)
    assert sorted(rows) == [2, 4]  # eval_every_n_steps=null: after each epoch's last step
    cfg = _cfg("tiny/full", overrides)
    model = _model_from(cfg, tmp_path / "epoch_2" / "model.safetensors")
    want, count = _plain_val_loss(model, cfg, assets.val)
    assert rows[4]["val_tokens"] == count
    assert rows[4]["val_loss"] == pytest.approx(want, abs=1e-6)


def test_missing_validation_file_names_the_key(assets, tmp_path):
    missing = tmp_path / "no_such_val.json"
    overrides = _common(assets, tmp_path) + LORA
    overrides[overrides.index(f"validation_dataset.data_files={assets.val}")] = (
        f"validation_dataset.data_files={missing}"
    )
    cfg = _cfg("tiny/lora", overrides)
    recipe = LoRAFinetuneRecipeSingleDevice(cfg)
    with pytest.raises(
        FileNotFoundError, match=f"validation_dataset.data_files: no file at '{missing}'"
    ):
        recipe.setup(cfg)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    "recipe, single, dist",
    [
        ("full_finetune", "tiny/full", "tiny/full_distributed"),
        ("lora_finetune", "tiny/lora", "tiny/lora_distributed"),
    ],
)
def test_two_ranks_give_the_one_device_val_loss(assets, tmp_path, recipe, single, dist):
    """lr=0: both runs validate the starting weights, so any difference is validation's own.
    9 samples in batches of 2 on 2 ranks: rank 0 runs 3 batches, rank 1 two and one extra
    forward that is not counted (FSDP's forwards are collective)."""
    from tests.recipes.test_full_finetune_distributed import run_tune_distributed

    extra = ["optimizer.lr=0", "epochs=1", "max_steps_per_epoch=2", "eval_every_n_steps=1"]
    extra += LORA if recipe == "lora_finetune" else []
    one, two = tmp_path / "one", tmp_path / "two"
    run_tune(f"{recipe}_single_device", single, _common(assets, one) + extra, cwd=tmp_path)
    overrides = _common(assets, two) + extra + ["batch_size=1"]  # per rank: the same steps
    run_tune_distributed(f"{recipe}_distributed", dist, overrides, cwd=tmp_path)
    rows_one, rows_two = _val_rows(one), _val_rows(two)
    assert sorted(rows_one) == sorted(rows_two) == [1, 2]
    for step in (1, 2):
        assert rows_two[step]["val_tokens"] == rows_one[step]["val_tokens"]
        assert rows_two[step]["val_loss"] == pytest.approx(rows_one[step]["val_loss"], abs=1e-6)
    cfg = _cfg(single, _common(assets, one) + extra)
    adapter = one / "epoch_1_adapter" / "adapter.safetensors" if recipe == "lora_finetune" else None
    model_file = one / "epoch_1" / "model.safetensors" if adapter is None else None
    model_file = model_file or Path(cfg.checkpointer.checkpoint_dir) / "model.safetensors"
    want, _ = _plain_val_loss(_model_from(cfg, model_file, adapter), cfg, assets.val)
    assert rows_one[2]["val_loss"] == pytest.approx(want, abs=1e-6)
