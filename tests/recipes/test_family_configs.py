# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The shipped per-family configs: their header says how to download and run them, and each one
trains as shipped (only paths, device, dtype and sizes overridden) from a tiny model folder laid
out as on the hub (config.json, safetensors, tokenizer.json with its chat template)."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.recipes.single_device_utils import read_disk_log, run_tune
from tests.recipes.test_family_recipes import BASE, FAMILIES
from tests.recipes.test_full_finetune_distributed import run_tune_distributed
from tests.test_utils import randomise_norms_and_biases_, sample_conversations
from tests.tokenizer_fixtures import QWEN3_LIKE_TEMPLATE, build_hf_tokenizer_dir
from tests.torchtune.models.test_gemma3_multimodal import TINY_SIGLIP
from torchtune import config
from torchtune._recipe_registry import RECIPES, get_config
from torchtune.models import hf_tokenizer

# Config folder -> (our test family, tokenizer pipeline, chat template of the real model).
FOLDERS = {
    "llama3_1": ("llama3", "byte_bpe", "llama3"),
    "llama3_2": ("llama3", "byte_bpe", "llama3"),
    "llama3_3": ("llama3", "byte_bpe", "llama3"),
    "smollm2": ("llama3", "byte_bpe", "chatml"),  # SmolLM2 speaks ChatML
    "mistral": ("mistral", "metaspace", "mistral"),
    "qwen2_5": ("qwen2", "byte_bpe", "chatml"),
    "qwen3": ("qwen3", "byte_bpe", "qwen3"),
    "phi3": ("phi3", "metaspace", "phi3"),
    "phi4": ("phi3", "byte_bpe", "chatml"),  # Phi-4 (14B) speaks ChatML; mini the phi3 turns
    "gemma2": ("gemma2", "metaspace", "gemma"),
    "gemma3": ("gemma3", "metaspace", "gemma"),
}
CONFIGS = sorted(
    (c.name, r.name, r.supports_distributed)
    for r in RECIPES
    for c in r.configs
    if c.alias_of is None and c.name.split("/")[0] in FOLDERS
)
# Configs whose download is a multimodal checkpoint (Gemma3ForConditionalGeneration): they run on
# a tiny multimodal folder.
MULTIMODAL = {"gemma3/4B_full_single_device", "gemma3/4B_lora_single_device"}


# One config per family in the default suite (a few seconds each); the rest are slow.
FAST = {
    "llama3_2/1B_full_single_device",
    "mistral/7B_lora_single_device",
    "qwen2_5/0_5B_lora_single_device",
    "qwen3/0_6B_full_single_device",
    "smollm2/135M_full_single_device",
    "phi3/mini_lora_single_device",
    "gemma2/2B_lora_single_device",
    "gemma3/1B_full_single_device",
    "gemma3/4B_lora_single_device",  # the multimodal folder, PEFT's adapter on it
}


def test_every_family_ships_full_and_lora_configs():
    # Per family (phi4/ adds LoRA configs to phi3's family, which ships both in phi3/).
    for family in {f for f, _, _ in FOLDERS.values()}:
        folders = [d for d, (f, _, _) in FOLDERS.items() if f == family]
        names = [n for n, _, _ in CONFIGS if n.split("/")[0] in folders]
        assert any("_full" in n for n in names) and any("_lora" in n for n in names), family
        assert all(any(n.startswith(d + "/") for n in names) for d in folders), family
    # Distributed configs where full fine-tuning needs more than one GPU's memory.
    assert {n for n, _, dist in CONFIGS if dist} >= {"llama3_1/8B_full", "mistral/7B_full"}


@pytest.mark.parametrize("name,recipe,distributed", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_header_gives_the_download_and_run_commands(name, recipe, distributed):
    path = get_config(name).file_path
    lines = path.read_text().splitlines()
    if distributed:  # full DPO needs room for the reference too: more GPUs
        assert re.fullmatch(
            rf"# tune --nnodes 1 --nproc_per_node \d+ {recipe} --config {name}", lines[0]
        )
    else:
        assert lines[0] == f"# tune {recipe} --config {name}"
    download = [line for line in lines if line.startswith("#   tune download ")]
    assert len(download) == 1, name
    cfg = config.load_config(path)
    config.validate(cfg)
    local = download[0].split("--output-dir ")[1].split()[0]
    # Every path the config reads is the folder the download line writes.
    assert cfg.model.config == cfg.tokenizer.path == cfg.checkpointer.checkpoint_dir == local
    assert cfg.model._component_ == "torchtune.models.from_hf_config"
    assert cfg.tokenizer._component_ == "torchtune.models.hf_tokenizer"
    dataset = "preference_dataset" if "dpo" in recipe else "chat_dataset"
    assert cfg.dataset._component_ == f"torchtune.datasets.{dataset}"


def _model_folder(root: Path, folder: str) -> Path:
    """A tiny model of the folder's family and a tokenizer with its template, in one folder."""
    import transformers

    family, kind, template = FOLDERS[folder]
    out = root / folder
    if out.exists():
        return out
    tok_dir = build_hf_tokenizer_dir(
        root / f"{folder}_tok",
        kind,
        "chatml" if template == "qwen3" else template,
        chat_template=QWEN3_LIKE_TEMPLATE if template == "qwen3" else None,
    )
    tok = hf_tokenizer(tok_dir)
    config_cls, model_cls, extra = FAMILIES[family]
    fields = {**BASE, **extra, "vocab_size": tok.vocab_size, "max_position_embeddings": 128}
    fields.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    hf_config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(0)
    model = randomise_norms_and_biases_(getattr(transformers, model_cls)(hf_config).float())
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tok_dir / name, out / name)
    return out


def _multimodal_folder(root: Path, folder: str) -> Path:
    """A tiny Gemma3ForConditionalGeneration (the gemma3 text decoder and a one-layer SigLIP
    tower) with the gemma tokenizer, saved as transformers saves it (the hub's key names)."""
    import transformers

    out = root / f"{folder}_multimodal"
    if out.exists():
        return out
    text_dir = _model_folder(root, folder)  # the tokenizer and the text decoder's settings
    text = transformers.AutoConfig.from_pretrained(text_dir)
    vision = transformers.SiglipVisionConfig(**TINY_SIGLIP)
    hf_config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(hf_config).float()
    randomise_norms_and_biases_(model).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(text_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_configs")
    # Mistral's template takes alternating user/assistant turns only: no system prompts.
    rows = [[m for m in c if m["role"] != "system"] for c in sample_conversations(8, seed=4)]
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    # Preference pairs in the hub's layout: the chosen conversation and one with another answer.
    pairs = [
        {
            "chosen": r,
            "rejected": r[:-1] + [{"role": "assistant", "content": rows[i - 1][-1]["content"]}],
        }
        for i, r in enumerate(rows)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


CASES = [pytest.param(*c, id=c[0], marks=() if c[0] in FAST else pytest.mark.slow) for c in CONFIGS]


@pytest.mark.parametrize("name,recipe,distributed", CASES)
def test_config_trains_as_shipped(root, name, recipe, distributed, tmp_path):
    folder = _multimodal_folder if name in MULTIMODAL else _model_folder
    model_dir = folder(root, name.split("/")[0])
    out = tmp_path / "out"
    overrides = [
        f"model.config={model_dir}",
        "model.max_seq_len=128",
        f"tokenizer.path={model_dir}",
        f"checkpointer.checkpoint_dir={model_dir}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"dataset.source={root / ('pairs.jsonl' if 'dpo' in recipe else 'chats.jsonl')}",
        "dataset.split=train",
        "dataset.max_seq_len=128",
        "device=cpu",
        "dtype=fp32",
        "batch_size=2",
        "gradient_accumulation_steps=1",
        "max_steps_per_epoch=2",
        f"output_dir={out}",
    ]
    if distributed:
        run_tune_distributed(recipe, name, overrides, cwd=tmp_path)
    else:
        run_tune(recipe, name, overrides, cwd=tmp_path)
    rows = read_disk_log(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    epoch = out / "epoch_1"
    assert (epoch / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    assert (epoch / "model.safetensors").is_file()
    if "lora" in name:
        assert (out / "epoch_1_peft" / "adapter_config.json").is_file()
    if name in MULTIMODAL:
        from safetensors.torch import load_file

        saved, original = (load_file(d / "model.safetensors") for d in (epoch, model_dir))
        assert set(saved) == set(original)
        vision = [k for k in original if not k.startswith("language_model.")]
        assert vision and all(torch.equal(saved[k], original[k]) for k in vision)
        trained = [k for k in original if k.startswith("language_model.")]
        # Trained (LoRA: the adapter merged in) and written under the hub's names again.
        assert any(not torch.equal(saved[k], original[k]) for k in trained)
        if "lora" in name:  # the adapter is on the multimodal model's language model only
            from peft import PeftModel
            from transformers import Gemma3ForConditionalGeneration

            base = Gemma3ForConditionalGeneration.from_pretrained(model_dir)
            peft = PeftModel.from_pretrained(base, out / "epoch_1_peft")
            adapted = [n for n, _ in peft.named_modules() if n.endswith(".lora_A")]
            assert adapted and all(".language_model.layers." in n for n in adapted)
