# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Conversation data through the real recipes: ``hf_tokenizer`` + ``chat_dataset`` + a model
from ``config.json``, against a plain transformers loop on the same batches, and two gloo ranks
(packed rows) against one device."""

import shutil
from pathlib import Path

import pytest
import torch

from tests.recipes.single_device_utils import hf_reference_losses, logged_losses, run_tune
from tests.recipes.test_full_finetune_distributed import (
    PER_RANK_BATCH,
    WORLD_SIZE,
    assert_same_weights,
    run_tune_distributed,
)
from tests.test_utils import randomise_norms_and_biases_, write_chat_jsonl
from tests.tokenizer_fixtures import build_hf_tokenizer_dir
from torchtune import config
from torchtune._recipe_registry import get_config
from torchtune.models import hf_tokenizer

STEPS = 6
MODEL_KEYS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim")
MODEL_KEYS += ("intermediate_dim", "max_seq_len")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A Llama 3-style tokenizer folder with its chat template, a tiny HF Llama sized to its
    vocabulary (tied, GQA), and multi-turn conversations: (model_dir, data)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("chat_recipes")
    tok_dir = build_hf_tokenizer_dir(root / "tokenizer", "byte_bpe", "llama3")
    tok = hf_tokenizer(tok_dir)
    hf_config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = randomise_norms_and_biases_(LlamaForCausalLM(hf_config).float().eval())
    model_dir = root / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    # One folder as on the hub; the tokenizer's generation_config.json (its stop ids) wins.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tok_dir / name, model_dir / name)
    return model_dir, write_chat_jsonl(root / "chats.jsonl", n=4 * STEPS, seed=2)


def chat_overrides(assets, out: Path) -> list:
    model_dir, data = assets
    return [f"~model.{k}" for k in MODEL_KEYS] + [
        "model._component_=torchtune.models.from_hf_config",
        f"+model.config={model_dir}",
        "+model.max_seq_len=256",
        f"checkpointer.checkpoint_dir={model_dir}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        "~checkpointer.model_type",
        "tokenizer._component_=torchtune.models.hf_tokenizer",
        f"tokenizer.path={model_dir}",
        "dataset._component_=torchtune.datasets.chat_dataset",
        f"dataset.source={data}",
        "~dataset.data_files",
        "dataset.max_seq_len=256",
        "dataset.train_on_input=False",
        "device=cpu",
        "dtype=fp32",
        "shuffle=False",
        "gradient_accumulation_steps=1",
        "epochs=1",
        f"max_steps_per_epoch={STEPS}",
        "clip_grad_norm=null",
        "optimizer.lr=1e-3",
        f"output_dir={out}",
    ]


def test_full_finetune_on_chat_data_equals_a_transformers_loop(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    overrides = chat_overrides(assets, out) + ["batch_size=2"]
    run_tune("full_finetune_single_device", "tiny/full", overrides, cwd=tmp_path)
    cfg = config.load_config(get_config("tiny/full").file_path, overrides)
    hf = AutoModelForCausalLM.from_pretrained(
        assets[0], dtype=torch.float32, attn_implementation="eager"
    ).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    # The reference loop builds its batches from the same config: hf_tokenizer + chat_dataset.
    expected = hf_reference_losses(hf, opt, cfg, steps_per_epoch=STEPS)
    torch.testing.assert_close(logged_losses(out), expected, rtol=0, atol=1e-4)


@pytest.mark.slow  # two runs, one of them on two processes
def test_two_ranks_on_packed_chat_data_match_one_device(assets, tmp_path):
    single, dist = tmp_path / "single", tmp_path / "dist"
    common = [o for o in chat_overrides(assets, single) if not o.startswith("output_dir=")]
    common += ["dataset.packed=True", "max_steps_per_epoch=3"]
    run_tune(
        "full_finetune_single_device",
        "tiny/full",
        [*common, f"batch_size={PER_RANK_BATCH * WORLD_SIZE}", f"output_dir={single}"],
        cwd=tmp_path,
    )
    run_tune_distributed(
        "full_finetune_distributed",
        "tiny/full_distributed",
        [*common, f"batch_size={PER_RANK_BATCH}", f"output_dir={dist}"],
        cwd=tmp_path,
    )
    ours, expected = logged_losses(dist), logged_losses(single)
    assert len(ours) == 3
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert_same_weights(
        single / "epoch_1/model.safetensors", dist / "epoch_1/model.safetensors", 1e-5
    )
    print(f"2 ranks, packed chat: max |loss diff| {(ours - expected).abs().max():.2e}")
