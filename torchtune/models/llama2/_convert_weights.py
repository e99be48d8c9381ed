# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pure state_dict maps between torchtune's Llama2 keys and Meta's / Hugging Face's.

torchtune keeps Meta's rotary layout (q/k rows interleave the two halves of each rotated
pair). HF permutes the rows of q_proj and k_proj so its ``rotate_half`` rotary works on
contiguous halves; ``_permute``/``_unpermute`` translate between the two.
"""

import re
from typing import Dict

import torch

# {layer} stands for the layer index in every pattern below.
_META_TO_TUNE = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "norm.weight": "norm.scale",
    "output.weight": "output.weight",
    "layers.{}.attention.wq.weight": "layers.{}.attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "layers.{}.attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "layers.{}.attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "layers.{}.attn.output_proj.weight",
    "layers.{}.attention_norm.weight": "layers.{}.sa_norm.scale",
    "layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
    "layers.{}.feed_forward.w1.weight": "layers.{}.mlp.w1.weight",
    "layers.{}.feed_forward.w2.weight": "layers.{}.mlp.w2.weight",
    "layers.{}.feed_forward.w3.weight": "layers.{}.mlp.w3.weight",
}

_HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
}

# Buffers some checkpoints carry that are recomputed from the config, never loaded.
_IGNORED = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), re.compile(r"^rope\.freqs$"))


def _map_key(key: str, mapping: Dict[str, str], source: str) -> str:
    abstract = re.sub(r"(?<=layers\.)\d+(?=\.)", "{}", key)
    if abstract not in mapping:
        raise ValueError(f"Unexpected key '{key}' in a {source} Llama2 checkpoint")
    layer = re.search(r"(?<=layers\.)\d+(?=\.)", key)
    return mapping[abstract].format(layer.group(0)) if layer else mapping[abstract]


def _is_ignored(key: str) -> bool:
    return any(p.search(key) for p in _IGNORED)


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> HF (halves) row order of a q/k projection."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    # [n_h, h_d/2, 2, in] -> [n_h, 2, h_d/2, in]
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (halves) -> Meta (interleaved pairs) row order of a q/k projection."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    # [n_h, 2, h_d/2, in] -> [n_h, h_d/2, 2, in]
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_tune(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Meta ``consolidated.00.pth`` keys -> torchtune keys. Tensors are not copied."""
    return {
        _map_key(k, _META_TO_TUNE, "Meta"): v for k, v in state_dict.items() if not _is_ignored(k)
    }


def tune_to_meta(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchtune keys -> Meta keys. Tensors are not copied."""
    inverse = {v: k for k, v in _META_TO_TUNE.items()}
    return {_map_key(k, inverse, "torchtune"): v for k, v in state_dict.items()}


def hf_to_tune(
    state_dict: Dict[str, torch.Tensor], num_heads: int, num_kv_heads: int
) -> Dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` keys -> torchtune keys, undoing HF's q/k row permutation.

    Args:
        state_dict: HF state dict (``model.layers.0.self_attn.q_proj.weight``, ...).
        num_heads: query heads (``num_attention_heads`` in HF's config.json).
        num_kv_heads: key/value heads (``num_key_value_heads``).

    Returns:
        A new dict with torchtune keys; only q/k weights are new tensors.
    """
    out = {}
    for key, value in state_dict.items():
        if _is_ignored(key):
            continue
        new_key = _map_key(key, _HF_TO_TUNE, "Hugging Face")
        if new_key.endswith("attn.q_proj.weight"):
            value = _unpermute(value, num_heads)
        elif new_key.endswith("attn.k_proj.weight"):
            value = _unpermute(value, num_kv_heads)
        out[new_key] = value
    return out


def tune_to_hf(
    state_dict: Dict[str, torch.Tensor], num_heads: int, num_kv_heads: int
) -> Dict[str, torch.Tensor]:
    """torchtune keys -> HF keys, applying HF's q/k row permutation. Inverse of ``hf_to_tune``."""
    inverse = {v: k for k, v in _HF_TO_TUNE.items()}
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.q_proj.weight"):
            value = _permute(value, num_heads)
        elif key.endswith("attn.k_proj.weight"):
            value = _permute(value, num_kv_heads)
        out[_map_key(key, inverse, "torchtune")] = value
    return out
