# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune full_finetune_single_device`` on a tied Llama 3-style checkpoint built with
``model: {_component_: torchtune.models.from_hf_config, config: <dir>}``, against a plain
training loop over transformers' LlamaForCausalLM; and two FSDP2 ranks (gloo, CPU) with the
tied Parameter against the single device."""

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.single_device_utils import (
    VOCAB_SIZE,
    hf_reference_losses,
    load_hf_model,
    logged_losses,
    run_tune,
)
from tests.recipes.test_full_finetune_distributed import run_tune_distributed
from tests.test_utils import tiny_hf_llama, train_sentencepiece, write_alpaca_json
from torchtune import config
from torchtune._recipe_registry import get_config

MODEL_KEYS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim")
MODEL_KEYS += ("intermediate_dim", "max_seq_len")


@pytest.fixture(scope="module")
def tied_assets(tmp_path_factory):
    """A tied, llama3-scaled tiny checkpoint with biases; returns (root, model_dir, overrides
    without output_dir)."""
    root = tmp_path_factory.mktemp("tied_llama3")
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    scaling.update(high_freq_factor=4.0, original_max_position_embeddings=16)
    model_dir = root / "hf_model"
    tiny_hf_llama(
        0,
        vocab_size=VOCAB_SIZE,
        head_dim=24,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=500_000.0,
        rope_scaling=scaling,
        tie_word_embeddings=True,
    ).save_pretrained(model_dir, safe_serialization=True)
    tokenizer = train_sentencepiece(root / "tok" / "sp", vocab_size=VOCAB_SIZE)
    data = write_alpaca_json(root / "alpaca.json", n=24)
    overrides = [f"~model.{k}" for k in MODEL_KEYS] + [
        "model._component_=torchtune.models.from_hf_config",
        f"+model.config={model_dir}",
        f"checkpointer.checkpoint_dir={model_dir}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={tokenizer}",
        "dataset.source=json",
        f"dataset.data_files={data}",
        "device=cpu",
        "dtype=fp32",
        "shuffle=False",
        "batch_size=2",
        "gradient_accumulation_steps=1",
        "epochs=1",
        "max_steps_per_epoch=4",
        "optimizer.lr=1e-3",
    ]
    return root, model_dir, overrides


def test_tied_llama3_model_from_hf_config_trains_like_hf(tied_assets, tmp_path):
    root, model_dir, overrides = tied_assets
    out = tmp_path / "out"
    overrides = [*overrides, f"output_dir={out}"]
    run_tune("full_finetune_single_device", "tiny/full", overrides, cwd=root)

    cfg = config.load_config(get_config("tiny/full").file_path, overrides)
    hf = load_hf_model(model_dir)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    expected = hf_reference_losses(hf, opt, cfg, steps_per_epoch=4)
    torch.testing.assert_close(logged_losses(out), expected, rtol=0, atol=1e-4)
    saved = load_file(out / "epoch_1" / "model.safetensors")
    assert "lm_head.weight" not in saved  # still tied: one table, as the input
    assert (out / "epoch_1" / "config.json").read_bytes() == (
        model_dir / "config.json"
    ).read_bytes()
    for name, param in hf.state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(saved[name], param, rtol=0, atol=1e-4, msg=name)


@pytest.mark.slow  # about 12 s: two runs, one of them on two processes
def test_two_ranks_with_a_tied_parameter_match_one_device(tied_assets, tmp_path):
    _, _, overrides = tied_assets
    single, dist = tmp_path / "single", tmp_path / "dist"
    common = [o for o in overrides if not o.startswith("batch_size=")]
    common += ["epochs=2", "max_steps_per_epoch=3"]
    run_tune(
        "full_finetune_single_device",
        "tiny/full",
        [*common, "batch_size=4", f"output_dir={single}"],
        cwd=tmp_path,
    )
    run_tune_distributed(
        "full_finetune_distributed",
        "tiny/full_distributed",
        [*common, "batch_size=2", f"output_dir={dist}"],
        cwd=tmp_path,
    )
    torch.testing.assert_close(logged_losses(dist), logged_losses(single), rtol=0, atol=1e-4)
    for epoch in (1, 2):
        a, b = (load_file(run / f"epoch_{epoch}" / "model.safetensors") for run in (single, dist))
        assert a.keys() == b.keys() and "lm_head.weight" not in b
        for name in a:
            # k_proj's bias has an exact gradient of zero (softmax ignores a shift shared by
            # all keys): AdamW's normalised step moves it by each run's round-off, up to lr.
            atol = 1e-3 if name.endswith("k_proj.bias") else 1e-5
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)
    state = torch.load(dist / "epoch_1_state" / "recipe_state.pt", weights_only=True)["optimizer"]
    want = torch.load(single / "epoch_1_state" / "recipe_state.pt", weights_only=True)["optimizer"]
    assert state["param_groups"] == want["param_groups"]
    for i, moments in want["state"].items():
        for key, value in moments.items():
            got = state["state"][i][key]
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-7, msg=f"{i}.{key}")
