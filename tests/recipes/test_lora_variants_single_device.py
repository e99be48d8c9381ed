# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune lora_finetune_single_device`` with DoRA (``model.use_dora=True``) and QLoRA
(``model.quantize_base=True``) on the tiny model: against transformers + PEFT loops, the
exports against PEFT and transformers."""

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
from tests.recipes.test_lora_finetune_single_device import RUN_OVERRIDES, _cfg, _our_lora_model
from torchtune.models.llama2 import tune_to_hf

RECIPE = "lora_finetune_single_device"
TARGETS = ["q_proj", "k_proj", "v_proj"]
DORA = ["model.use_dora=True"]
QLORA = ["model.quantize_base=True"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("lora_variant_assets"))


def _run(assets, out, extra):
    out.mkdir(parents=True, exist_ok=True)
    overrides = tiny_overrides(assets, out) + RUN_OVERRIDES + extra
    run_tune(RECIPE, "tiny/lora", overrides, cwd=out)
    return out, overrides


@pytest.fixture(scope="module")
def dora_run(assets, tmp_path_factory):
    return _run(assets, tmp_path_factory.mktemp("dora_run"), DORA)


@pytest.fixture(scope="module")
def qlora_run(assets, tmp_path_factory):
    return _run(assets, tmp_path_factory.mktemp("qlora_run"), QLORA)


def _hf_with_our_base(assets, ours):
    """The HF model holding our model's base weights as it holds them (a QLoRA model's
    dequantized), so quantization is the only difference from LoRA on the same base."""
    hf = load_hf_model(assets.model_dir)
    base = {
        k: v
        for k, v in ours.state_dict().items()
        if "lora_" not in k and not k.endswith("magnitude")
    }
    missing, unexpected = hf.load_state_dict(tune_to_hf(base), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def _peft_reference_losses(assets, cfg, ours_init, hf, use_dora):
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    peft_model = get_peft_model(
        hf,
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_dora=use_dora),
    )
    with torch.no_grad():
        for i, layer in enumerate(peft_model.base_model.model.model.layers):
            for proj in TARGETS:
                peft_layer = getattr(layer.self_attn, proj)
                peft_layer.lora_A["default"].weight.copy_(
                    ours_init[f"layers.{i}.attn.{proj}.lora_a.weight"]
                )
                if use_dora:  # PEFT takes it from the base as we do: the same numbers
                    torch.testing.assert_close(
                        peft_layer.lora_magnitude_vector["default"].weight,
                        ours_init[f"layers.{i}.attn.{proj}.magnitude"],
                        rtol=0,
                        atol=1e-6,
                    )
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    return hf_reference_losses(peft_model, opt, cfg, steps_per_epoch=5, scheduler=sched)


def test_dora_losses_match_peft_training_loop(dora_run, assets):
    out, overrides = dora_run
    cfg = _cfg(overrides)
    ours = _our_lora_model(cfg)
    expected = _peft_reference_losses(
        assets, cfg, ours.state_dict(), load_hf_model(assets.model_dir), use_dora=True
    )
    torch.testing.assert_close(logged_losses(out), expected, rtol=0, atol=1e-4)


def _check_exports(out, overrides, assets, hf_base):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    epoch_dir = out / "epoch_2"
    adapter = load_file(out / "epoch_2_adapter" / "adapter.safetensors")
    ours = _our_lora_model(_cfg(overrides), adapter)
    tokens = torch.randint(0, 400, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        peft_model = PeftModel.from_pretrained(hf_base.eval(), out / "epoch_2_peft").eval()
        torch.testing.assert_close(peft_model(input_ids=tokens).logits, expected, rtol=0, atol=1e-5)
        merged = LlamaForCausalLM.from_pretrained(epoch_dir, attn_implementation="eager").eval()
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, rtol=0, atol=2e-5)
    base_dtype = next(iter(load_file(assets.model_dir / "model.safetensors").values())).dtype
    assert all(v.dtype == base_dtype for v in load_file(epoch_dir / "model.safetensors").values())
    return adapter


def test_dora_exports_load_in_peft_and_transformers(dora_run, assets):
    """The adapter carries the magnitudes under PEFT's ``lora_magnitude_vector`` and
    ``use_dora: true``; the merged model folds them in."""
    import json

    out, overrides = dora_run
    adapter = _check_exports(out, overrides, assets, load_hf_model(assets.model_dir))
    assert sum(k.endswith(".magnitude") for k in adapter) == 3 * len(TARGETS)
    peft_sd = load_file(out / "epoch_2_peft" / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in peft_sd) == 3 * len(TARGETS)
    peft_config = json.loads((out / "epoch_2_peft" / "adapter_config.json").read_text())
    assert peft_config["use_dora"] is True


def test_qlora_losses_match_lora_on_the_dequantized_weights(qlora_run, assets):
    """10 QLoRA steps = transformers + PEFT LoRA over our dequantized base weights; the first
    step scores the quantized base model."""
    out, overrides = qlora_run
    cfg = _cfg(overrides)
    ours = _our_lora_model(cfg)
    assert ours.layers[0].mlp.w1.weight_nf4 is not None  # quantized, adapter or not
    losses = logged_losses(out)
    hf = _hf_with_our_base(assets, ours)
    batches = iter(reference_batches(cfg))
    micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
    n_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
    with torch.no_grad():
        first = sum(
            torch.nn.functional.cross_entropy(
                hf.eval()(input_ids=mb["tokens"]).logits[:, :-1].flatten(0, 1),
                mb["labels"][:, 1:].flatten(),
                reduction="sum",
            )
            for mb in micro
        )
    assert losses[0].item() == pytest.approx((first / n_tokens).item(), abs=1e-5)
    expected = _peft_reference_losses(assets, cfg, ours.state_dict(), hf.train(), use_dora=False)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-4)
    # The quantization is felt: the unquantized base scores differently.
    full = load_hf_model(assets.model_dir).eval()
    with torch.no_grad():
        full_first = full(input_ids=micro[0]["tokens"]).logits
        assert not torch.allclose(full_first, hf(input_ids=micro[0]["tokens"]).logits)


def test_qlora_exports_dequantized_merged_model_and_peft_adapter(qlora_run, assets):
    out, overrides = qlora_run
    hf_base = _hf_with_our_base(assets, _our_lora_model(_cfg(overrides)))
    _check_exports(out, overrides, assets, hf_base)


@pytest.mark.slow
def test_qdora_losses_match_peft_dora_on_the_dequantized_weights(assets, tmp_path):
    out, overrides = _run(assets, tmp_path, QLORA + DORA)
    cfg = _cfg(overrides)
    ours = _our_lora_model(cfg)
    hf = _hf_with_our_base(assets, ours)
    expected = _peft_reference_losses(assets, cfg, ours.state_dict(), hf, use_dora=True)
    torch.testing.assert_close(logged_losses(out), expected, rtol=0, atol=1e-4)
    _check_exports(out, overrides, assets, _hf_with_our_base(assets, ours))


@pytest.mark.slow
@pytest.mark.parametrize("variant", [QLORA, QLORA + DORA], ids=["qlora", "qdora"])
def test_resumed_run_equals_the_uninterrupted_one(assets, tmp_path, variant):
    out, overrides = _run(assets, tmp_path / "full", variant)
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "levers",
    [["enable_activation_checkpointing=True"], ["compile=True"]],
    ids=["activation_checkpointing", "compile"],
)
@pytest.mark.parametrize("variant", [QLORA, DORA], ids=["qlora", "dora"])
def test_levers_keep_the_losses(assets, tmp_path, variant, levers):
    ref, _ = _run(assets, tmp_path / "eager", variant)
    out, _ = _run(assets, tmp_path / "lever", variant + levers)
    torch.testing.assert_close(logged_losses(out), logged_losses(ref), rtol=0, atol=1e-5)
