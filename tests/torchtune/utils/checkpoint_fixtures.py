# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Write tiny HF / Meta checkpoints to disk for the checkpointer tests."""

import json
from pathlib import Path
from typing import Dict, List

import torch
from safetensors.torch import save_file

from tests.test_utils import tiny_hf_llama
from torchtune.models.llama2 import hf_to_tune, llama2, tune_to_meta


def hf_state_dict(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_hf_checkpoint(
    ckpt_dir: Path, model, n_shards: int = 1, fmt: str = "safetensors", with_index: bool = True
) -> List[str]:
    """Split ``model``'s weights over ``n_shards`` files (HF names), write config.json and,
    when sharded and ``with_index``, the index. Returns the file names."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(ckpt_dir / "config.json"))
    sd = hf_state_dict(model)
    keys = list(sd)
    if n_shards == 1:
        names = ["model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"]
    else:
        base = "model" if fmt == "safetensors" else "pytorch_model"
        names = [f"{base}-{i + 1:05d}-of-{n_shards:05d}.{fmt}" for i in range(n_shards)]
    weight_map = {}
    per = -(-len(keys) // n_shards)
    for i, name in enumerate(names):
        shard = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
        weight_map.update({k: name for k in shard})
        if fmt == "safetensors":
            save_file(shard, str(ckpt_dir / name), metadata={"format": "pt"})
        else:
            torch.save(shard, ckpt_dir / name)
    if n_shards > 1 and with_index:
        index_name = f"{names[0].split('-')[0]}.{fmt}.index.json"
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (ckpt_dir / index_name).write_text(json.dumps(index))
    return names


def write_meta_checkpoint(ckpt_dir: Path, model) -> str:
    """Meta layout of an HF model's weights: consolidated.00.pth + params.json."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    c = model.config
    sd = hf_to_tune(hf_state_dict(model))
    sd = tune_to_meta(sd, c.num_attention_heads, c.num_key_value_heads)
    torch.save({k: v.contiguous() for k, v in sd.items()}, ckpt_dir / "consolidated.00.pth")
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "multiple_of": 8,
        "norm_eps": c.rms_norm_eps,
    }
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    return "consolidated.00.pth"


def tiny_hf(num_kv_heads: int = 2, seed: int = 0):
    return tiny_hf_llama(seed, num_kv_heads=num_kv_heads)


def ours_like(hf_model, **kwargs):
    """Our llama2 with the sizes of ``tiny_hf_llama``'s config (weights not loaded)."""
    c = hf_model.config
    return llama2(
        vocab_size=c.vocab_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        embed_dim=c.hidden_size,
        max_seq_len=c.max_position_embeddings,
        intermediate_dim=c.intermediate_size,
        norm_eps=c.rms_norm_eps,
        **kwargs,
    ).eval()
