# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""End-to-end tests of ``tune lora_finetune_single_device`` on a tiny model, on CPU."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.single_device_utils import (
    build_tiny_assets,
    hf_reference_losses,
    load_hf_model,
    logged_losses,
    read_disk_log,
    reference_batches,
    run_tune,
    tiny_overrides,
)
from torchtune import config, utils
from torchtune._recipe_registry import get_config
from torchtune.config._resolvers import PACKAGE_DIR
from torchtune.models.llama2 import hf_to_tune
from torchtune.modules.peft import get_adapter_params, init_lora_adapters
from torchtune.recipes.lora_finetune_single_device import LoRAFinetuneRecipeSingleDevice

RECIPE = "lora_finetune_single_device"
NUM_HEADS, NUM_KV_HEADS = 4, 2
# 40 samples, batches of 2, 2 micro-batches per step: 5 optimizer steps an epoch.
RUN_OVERRIDES = [
    "shuffle=False",
    "batch_size=2",
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
    "clip_grad_norm=0.05",  # small enough to bite: the parity test covers clipping
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("lora_assets"))


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """Two epochs of five steps; returns (output_dir, overrides)."""
    out = tmp_path_factory.mktemp("lora_run")
    overrides = tiny_overrides(assets, out) + RUN_OVERRIDES
    run_tune(RECIPE, "tiny/lora", overrides, cwd=out)
    return out, overrides


def _cfg(overrides):
    return config.load_config(get_config("tiny/lora").file_path, overrides)


def _our_lora_model(cfg, adapter=None):
    """The recipe's model as it is right after construction: the base weights, and the given
    adapter or, as the recipe draws a fresh one, ``init_lora_adapters(model, seed)``."""
    utils.set_seed(cfg.seed)
    model = config.instantiate(cfg.model)
    hf_sd = load_file(Path(cfg.checkpointer.checkpoint_dir) / "model.safetensors")
    base = hf_to_tune(hf_sd)
    model.load_state_dict(base, strict=False)
    if adapter is None:
        adapter = init_lora_adapters(model, cfg.seed)
    model.load_state_dict(adapter, strict=False)
    return model.eval()


def test_losses_match_peft_training_loop(lora_run, assets):
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    out, overrides = lora_run
    cfg = _cfg(overrides)
    ours_init = _our_lora_model(cfg).state_dict()
    peft_model = get_peft_model(
        load_hf_model(assets.model_dir),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0
        ),
    )
    with torch.no_grad():
        # Same A as ours (A is on the input side: no q/k row permutation); B starts at zero.
        for i, layer in enumerate(peft_model.base_model.model.model.layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                lora_a = getattr(layer.self_attn, proj).lora_A["default"].weight
                lora_a.copy_(ours_init[f"layers.{i}.attn.{proj}.lora_a.weight"])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    expected = hf_reference_losses(peft_model, opt, cfg, steps_per_epoch=5, scheduler=sched)
    ours = logged_losses(out)
    assert len(ours) == 10
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    # The logged lr follows warm-up then cosine, as transformers' schedule does.
    lrs = [r["lr"] for r in read_disk_log(out)]
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    ref_sched = get_cosine_schedule_with_warmup(ref_opt, 2, 10)
    ref_lrs = []
    for _ in range(10):
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step(), ref_sched.step()
    assert lrs == pytest.approx(ref_lrs, abs=1e-12)


def test_first_loss_is_the_base_models(lora_run, assets):
    """B starts at zero, so step 1 scores the untouched base model."""
    out, overrides = lora_run
    cfg = _cfg(overrides)
    hf = load_hf_model(assets.model_dir).eval()
    batches = iter(reference_batches(cfg))
    micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
    n_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
    with torch.no_grad():
        total = sum(
            torch.nn.functional.cross_entropy(
                hf(input_ids=mb["tokens"]).logits[:, :-1].flatten(0, 1),
                mb["labels"][:, 1:].flatten(),
                reduction="sum",
            )
            for mb in micro
        )
    assert logged_losses(out)[0].item() == pytest.approx((total / n_tokens).item(), abs=1e-5)


def test_only_adapters_are_trained(assets, tmp_path):
    cfg = _cfg(tiny_overrides(assets, tmp_path) + RUN_OVERRIDES)
    recipe = LoRAFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    model = recipe._model
    adapter = get_adapter_params(model)
    assert adapter and all("lora_a" in k or "lora_b" in k for k in adapter)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter)
    in_optimizer = {id(p) for group in recipe._optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in adapter.values()}
    recipe.cleanup()


def test_exports_load_in_peft_and_transformers(lora_run, assets):
    """epoch_N/ holds the merged model (HF format) alone; our adapter is in epoch_N_adapter/,
    PEFT's in epoch_N_peft/ (so transformers' from_pretrained(epoch_N) does not apply it a
    second time, and a *.safetensors glob of epoch_N/ finds only the model)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out, overrides = lora_run
    epoch_dir = out / "epoch_2"
    assert sorted(p.name for p in epoch_dir.glob("*.safetensors")) == ["model.safetensors"]
    adapter = load_file(out / "epoch_2_adapter" / "adapter.safetensors")
    assert set(adapter) == {
        f"layers.{i}.attn.{p}.lora_{ab}.weight"
        for i in range(3)
        for p in ("q_proj", "k_proj", "v_proj")
        for ab in "ab"
    }
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_b" in k)  # trained
    ours = _our_lora_model(_cfg(overrides), adapter)
    tokens = torch.randint(0, 400, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        peft_model = PeftModel.from_pretrained(
            load_hf_model(assets.model_dir).eval(), out / "epoch_2_peft"
        )
        torch.testing.assert_close(peft_model(input_ids=tokens).logits, expected, rtol=0, atol=1e-5)
        merged = LlamaForCausalLM.from_pretrained(epoch_dir, attn_implementation="eager").eval()
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, rtol=0, atol=2e-5)
    peft_config = json.loads((out / "epoch_2_peft" / "adapter_config.json").read_text())
    assert peft_config["r"] == 4 and peft_config["lora_alpha"] == 8
    assert sorted(peft_config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    assert (out / "epoch_1_state" / "recipe_state.pt").is_file()
    assert not (out / "epoch_2_state").exists()


@pytest.mark.slow
def test_resume_gives_identical_second_epoch(lora_run, tmp_path):
    out, overrides = lora_run
    resumed = tmp_path / "resumed"
    run_tune(
        RECIPE,
        "tiny/lora",
        overrides
        + [
            f"checkpointer.adapter_checkpoint={out / 'epoch_1_adapter' / 'adapter.safetensors'}",
            f"checkpointer.recipe_checkpoint={out / 'epoch_1_state' / 'recipe_state.pt'}",
            "resume_from_checkpoint=True",
            f"output_dir={resumed}",
        ],
        cwd=tmp_path,
    )
    torch.testing.assert_close(logged_losses(resumed), logged_losses(out)[5:], rtol=0, atol=0)
    assert [r["lr"] for r in read_disk_log(resumed)] == [r["lr"] for r in read_disk_log(out)][5:]
    for name in ("epoch_2_adapter/adapter.safetensors", "epoch_2/model.safetensors"):
        a, b = load_file(out / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{name}: {key}")


@pytest.mark.skipif(
    not (PACKAGE_DIR / "assets" / "tiny" / "model" / "model.safetensors").is_file(),
    reason="the tiny model is not bundled yet (scripts/make_tiny_assets.py)",
)
def test_tiny_config_runs_on_bundled_assets(tmp_path):
    run_tune(RECIPE, "tiny/lora", [f"output_dir={tmp_path}", "max_steps_per_epoch=3"], cwd=tmp_path)
    losses = logged_losses(tmp_path)
    assert len(losses) == 3 and torch.isfinite(losses).all()
    assert (tmp_path / "epoch_1_adapter" / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_mlp_and_output_adapters_export_to_peft(assets, tmp_path):
    from peft import PeftModel

    overrides = (
        tiny_overrides(assets, tmp_path)
        + RUN_OVERRIDES
        + [
            "epochs=1",
            "max_steps_per_epoch=2",
            "model.lora_attn_modules=[output_proj]",
            "model.apply_lora_to_mlp=True",
            "model.apply_lora_to_output=True",
        ]
    )
    run_tune(RECIPE, "tiny/lora", overrides, cwd=tmp_path)
    adapter_dir = tmp_path / "epoch_1_peft"
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(peft_config["target_modules"]) == sorted(
        ["o_proj", "gate_proj", "down_proj", "up_proj", "lm_head"]
    )
    adapter = load_file(tmp_path / "epoch_1_adapter" / "adapter.safetensors")
    ours = _our_lora_model(_cfg(overrides), adapter)
    tokens = torch.randint(0, 400, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(load_hf_model(assets.model_dir).eval(), adapter_dir)
        torch.testing.assert_close(
            peft_model(input_ids=tokens).logits, ours(tokens), rtol=0, atol=1e-5
        )


@pytest.mark.slow
def test_compile_gives_the_same_losses(lora_run, tmp_path):
    """`compile=True` (torch.compile of each decoder layer, LoRA layers inside) trains the same
    adapters: the 10 logged losses agree with the eager run's within 1e-5."""
    out, overrides = lora_run
    run_tune(
        RECIPE, "tiny/lora", overrides + ["compile=True", f"output_dir={tmp_path}"], cwd=tmp_path
    )
    torch.testing.assert_close(logged_losses(tmp_path), logged_losses(out), rtol=0, atol=1e-5)
