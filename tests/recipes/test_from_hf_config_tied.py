# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune full_finetune_single_device`` on a tied Llama 3-style checkpoint built with
``model: {_component_: torchtune.models.from_hf_config, config: <dir>}``, against a plain
training loop over transformers' LlamaForCausalLM."""

import torch
from safetensors.torch import load_file

from tests.recipes.single_device_utils import (
    VOCAB_SIZE,
    hf_reference_losses,
    load_hf_model,
    logged_losses,
    run_tune,
)
from tests.test_utils import tiny_hf_llama, train_sentencepiece, write_alpaca_json
from torchtune import config
from torchtune._recipe_registry import get_config

MODEL_KEYS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim")
MODEL_KEYS += ("intermediate_dim", "max_seq_len")


def test_tied_llama3_model_from_hf_config_trains_like_hf(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    scaling.update(high_freq_factor=4.0, original_max_position_embeddings=16)
    model_dir = tmp_path / "hf_model"
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
    tokenizer = train_sentencepiece(tmp_path / "tok" / "sp", vocab_size=VOCAB_SIZE)
    data = write_alpaca_json(tmp_path / "alpaca.json", n=24)
    out = tmp_path / "out"
    overrides = [f"~model.{k}" for k in MODEL_KEYS] + [
        "model._component_=torchtune.models.from_hf_config",
        f"+model.config={model_dir}",
        f"checkpointer.checkpoint_dir={model_dir}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={tokenizer}",
        "dataset.source=json",
        f"dataset.data_files={data}",
        f"output_dir={out}",
        "device=cpu",
        "dtype=fp32",
        "shuffle=False",
        "batch_size=2",
        "gradient_accumulation_steps=1",
        "epochs=1",
        "max_steps_per_epoch=4",
        "optimizer.lr=1e-3",
    ]
    run_tune("full_finetune_single_device", "tiny/full", overrides, cwd=tmp_path)

    cfg = config.load_config(get_config("tiny/full").file_path, overrides)
    hf = load_hf_model(model_dir)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    expected = hf_reference_losses(hf, opt, cfg, steps_per_epoch=4)
    torch.testing.assert_close(logged_losses(out), expected, rtol=0, atol=1e-4)
    saved = load_file(out / "epoch_0" / "model.safetensors")
    assert "lm_head.weight" not in saved  # still tied: one table, as the input
    assert (out / "epoch_0" / "config.json").read_bytes() == (
        model_dir / "config.json"
    ).read_bytes()
    for name, param in hf.state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(saved[name], param, rtol=0, atol=1e-4, msg=name)
