# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pure maps between torchtune's Llama2 state dicts / configs and Hugging Face's, Meta's, PEFT's.

Our rotary layout is HF's (each head's two halves are the rotated pairs), so HF and PEFT
checkpoints convert by renaming keys alone. Meta's checkpoints rotate interleaved pairs
``(x[2i], x[2i + 1])``: their q/k rows are permuted once, here, in ``meta_to_tune`` /
``tune_to_meta``. State dict in, state dict out; nothing here touches a file.
"""

import re
from typing import Any, Dict, Optional, Tuple

import torch

from torchtune.models import _hf_common as common

# Part of this family's converter unit, shared with the other Llama-layout families.
from torchtune.models._hf_common import lora_targets_to_hf as lora_targets_to_hf
from torchtune.models._hf_common import tune_to_peft_adapter_config as tune_to_peft_adapter_config
from torchtune.modules.position_embeddings import ROPE_SCALING_KEYS

# {} stands for the layer index in every pattern below.
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
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
}
# Projections, with their biases when ``attention_bias`` / ``mlp_bias`` is true.
_HF_TO_TUNE.update(
    {
        f"model.layers.{{}}.{hf}.{p}": f"layers.{{}}.{ours}.{p}"
        for hf, ours in (
            ("self_attn.q_proj", "attn.q_proj"),
            ("self_attn.k_proj", "attn.k_proj"),
            ("self_attn.v_proj", "attn.v_proj"),
            ("self_attn.o_proj", "attn.output_proj"),
            ("mlp.gate_proj", "mlp.w1"),
            ("mlp.down_proj", "mlp.w2"),
            ("mlp.up_proj", "mlp.w3"),
        )
        for p in ("weight", "bias")
    }
)
_TUNE_TO_HF = {v: k for k, v in _HF_TO_TUNE.items()}
_TUNE_TO_META = {v: k for k, v in _META_TO_TUNE.items()}

# Buffers some checkpoints carry that are recomputed from the config, never loaded.
_IGNORED = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), re.compile(r"^rope\.freqs$"))


def _is_ignored(key: str) -> bool:
    return any(p.search(key) for p in _IGNORED)


def _meta_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> our/HF (halves) row order of a q/k projection."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    # [n_h, h_d/2, 2, in] -> [n_h, 2, h_d/2, in]
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _halves_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our/HF (halves) -> Meta (interleaved pairs) row order of a q/k projection."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    # [n_h, 2, h_d/2, in] -> [n_h, h_d/2, 2, in]
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ---- Hugging Face: a rename ---------------------------------------------------------------
def hf_to_tune(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` keys -> torchtune keys. Tensors are not copied.

    Args:
        state_dict: HF state dict (``model.layers.0.self_attn.q_proj.weight``, ...); rotary
            ``inv_freq`` buffers are dropped.

    Returns:
        A new dict with torchtune keys holding the same tensors.

    Raises:
        ValueError: on a key that is not part of an HF Llama checkpoint.
    """
    return {
        common.map_key(k, _HF_TO_TUNE, "Hugging Face Llama2"): v
        for k, v in state_dict.items()
        if not _is_ignored(k)
    }


def tune_to_hf(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchtune keys -> HF keys; inverse of :func:`hf_to_tune`. Tensors are not copied."""
    return {common.map_key(k, _TUNE_TO_HF, "torchtune Llama2"): v for k, v in state_dict.items()}


# ---- Meta: a rename plus the q/k row permutation --------------------------------------------
def meta_to_tune(
    state_dict: Dict[str, torch.Tensor], num_heads: int, num_kv_heads: int
) -> Dict[str, torch.Tensor]:
    """Meta ``consolidated.00.pth`` keys -> torchtune keys, q/k rows into our rotary layout.

    Args:
        state_dict: Meta state dict (``layers.0.attention.wq.weight``, ...); ``rope.freqs``
            is dropped.
        num_heads: query heads (``n_heads`` in params.json).
        num_kv_heads: key/value heads (``n_kv_heads``, or ``n_heads`` when absent).

    Returns:
        A new dict with torchtune keys; only q/k weights are new tensors.

    Raises:
        ValueError: on a key that is not part of a Meta Llama2 checkpoint.
    """
    out = {}
    for key, value in state_dict.items():
        if _is_ignored(key):
            continue
        new_key = common.map_key(key, _META_TO_TUNE, "Meta Llama2")
        if new_key.endswith("attn.q_proj.weight"):
            value = _meta_to_halves(value, num_heads)
        elif new_key.endswith("attn.k_proj.weight"):
            value = _meta_to_halves(value, num_kv_heads)
        out[new_key] = value
    return out


def tune_to_meta(
    state_dict: Dict[str, torch.Tensor], num_heads: int, num_kv_heads: int
) -> Dict[str, torch.Tensor]:
    """torchtune keys -> Meta keys, q/k rows into Meta's layout; inverse of
    :func:`meta_to_tune` (same arguments)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.q_proj.weight"):
            value = _halves_to_meta(value, num_heads)
        elif key.endswith("attn.k_proj.weight"):
            value = _halves_to_meta(value, num_kv_heads)
        out[common.map_key(key, _TUNE_TO_META, "torchtune Llama2")] = value
    return out


# ---- PEFT adapters: a rename (shared with the other Llama-layout families) ----------------
def tune_to_peft_adapter_weights(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchtune adapter keys -> PEFT ``adapter_model.safetensors`` keys. Tensors are shared.

    Args:
        state_dict: ``{"layers.0.attn.q_proj.lora_a.weight": [r, in], ...lora_b: [out, r]}``.

    Returns:
        ``{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ..., ...}``.

    Raises:
        ValueError: on a key that is not a LoRA weight of a known Llama2 module.
    """
    return common.tune_to_peft_adapter(state_dict, _TUNE_TO_HF, "Llama2")


def peft_to_tune_adapter_weights(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """PEFT adapter keys -> torchtune adapter keys; inverse of
    :func:`tune_to_peft_adapter_weights`.

    Raises:
        ValueError: on a key that is not a PEFT LoRA weight of a known Llama module.
    """
    return common.peft_to_tune_adapter(state_dict, _HF_TO_TUNE, "Llama2")


# ---- configs ---------------------------------------------------------------------------------
def _require(config: Dict[str, Any], key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise ValueError(f"{source} lacks '{key}'; got keys {sorted(config)}")
    return config[key]


# Keys of HF configs of other architectures (mixture of experts) that a Llama model would ignore.
_MOE_KEYS = (
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "n_routed_experts",
    "moe_intermediate_size",
)


def _rope(config: Dict[str, Any]) -> Tuple[float, Optional[Dict[str, Any]]]:
    """``(rope_theta, scaling)`` from either ``config.json`` layout.

    The hub's files have ``rope_theta`` on top and ``rope_scaling: {"type" or "rope_type",
    "factor", ...}``; transformers >= 5 writes one ``rope_parameters`` dict holding
    ``rope_theta``, ``rope_type`` and the scaling's keys.
    """
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = float(
        params.get("rope_theta") or scaling.get("rope_theta") or config.get("rope_theta") or 1e4
    )
    scaled = {
        key: d
        for key, d in (("rope_parameters", params), ("rope_scaling", scaling))
        if (d.get("rope_type") or d.get("type") or "default") != "default"
    }
    types = {key: d.get("rope_type") or d.get("type") for key, d in scaled.items()}
    if len(set(types.values())) > 1:
        raise ValueError(f"config.json has two RoPE scalings that disagree: {types}")
    key, merged = next(iter(scaled.items()), ("rope_parameters", dict(params)))
    merged = dict(merged)
    rope_type = types.get(key, "default")
    partial = merged.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"config.json has partial_rotary_factor {partial}; the llama2 family rotates "
            "whole heads"
        )
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"config.json {key} has rope_type '{rope_type}', which is not implemented; "
            f"supported: default, {', '.join(sorted(ROPE_SCALING_KEYS))}"
        )
    out: Dict[str, Any] = {"rope_type": rope_type}
    if rope_type == "llama3":
        # As transformers: a top-level original_max_position_embeddings wins, then the
        # scaling's own, then max_position_embeddings.
        merged["original_max_position_embeddings"] = (
            config.get("original_max_position_embeddings")
            or merged.get("original_max_position_embeddings")
            or config.get("max_position_embeddings")
        )
    for name in ROPE_SCALING_KEYS[rope_type]:
        if merged.get(name) is None:
            raise ValueError(f"config.json {key} of rope_type '{rope_type}' lacks '{name}'")
        value = merged[name]
        out[name] = int(value) if name == "original_max_position_embeddings" else float(value)
    return theta, out


def _refuse_unimplemented(config: Dict[str, Any]) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json has hidden_act '{config['hidden_act']}'; the llama2 family is SiLU"
        )
    for key in _MOE_KEYS:
        if config.get(key):
            raise ValueError(
                f"config.json has {key}={config[key]}: mixture-of-experts models are not "
                "implemented"
            )
    if config.get("quantization_config"):
        method = config["quantization_config"]
        method = method.get("quant_method", method) if isinstance(method, dict) else method
        raise ValueError(
            f"config.json has quantization_config ({method}): quantized checkpoints are not "
            "implemented; use the unquantized weights"
        )


def hf_config_to_builder_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """HF ``config.json`` contents -> keyword arguments of :func:`llama2`.

    ``llama2(**hf_config_to_builder_kwargs(config))`` computes what ``LlamaForCausalLM``
    built from ``config`` computes. ``pretraining_tp`` is accepted and ignored: transformers'
    Llama no longer reads it (it only split the projections' matmuls, the same math).

    Args:
        config: the parsed ``config.json`` of an HF Llama checkpoint (either layout of the
            RoPE settings: ``rope_theta`` + ``rope_scaling``, or ``rope_parameters``).

    Returns:
        ``{"vocab_size": ..., "num_layers": ..., ...}``.

    Raises:
        ValueError: on a missing size, or a setting this family does not implement
            (``hidden_act`` other than SiLU, RoPE scaling other than ``linear`` and
            ``llama3``, partial rotary, mixture-of-experts keys, ``quantization_config``),
            naming the key and its value.
    """
    src = "config.json"
    _refuse_unimplemented(config)
    rope_base, rope_scaling = _rope(config)
    heads = int(_require(config, "num_attention_heads", src))
    return {
        "vocab_size": int(_require(config, "vocab_size", src)),
        "num_layers": int(_require(config, "num_hidden_layers", src)),
        "num_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "embed_dim": int(_require(config, "hidden_size", src)),
        "max_seq_len": int(_require(config, "max_position_embeddings", src)),
        "intermediate_dim": int(_require(config, "intermediate_size", src)),
        "attn_dropout": float(config.get("attention_dropout", 0.0)),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_base": rope_base,
        "rope_scaling": rope_scaling,
        "head_dim": config.get("head_dim"),
        "attn_bias": bool(config.get("attention_bias", False)),
        "mlp_bias": bool(config.get("mlp_bias", False)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def meta_params_to_hf_config(params: Dict[str, Any]) -> Dict[str, Any]:
    """Meta ``params.json`` -> the ``config.json`` keys that describe the same sizes.

    ``intermediate_size`` is left out (Meta derives it from ``multiple_of`` and
    ``ffn_dim_multiplier``; it is not guessed here), and so is ``vocab_size`` when
    params.json has none (or -1).

    Raises:
        ValueError: if ``dim``, ``n_layers`` or ``n_heads`` is missing.
    """
    src = "params.json"
    heads = int(_require(params, "n_heads", src))
    config = {
        "hidden_size": int(_require(params, "dim", src)),
        "num_hidden_layers": int(_require(params, "n_layers", src)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or heads),
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": float(params.get("rope_theta", 10_000.0)),
    }
    vocab = params.get("vocab_size")
    if vocab and vocab > 0:
        config["vocab_size"] = int(vocab)
    return config


def expected_shapes(config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Native-key tensor shapes of the model ``config`` (HF ``config.json`` keys) describes.

    Sizes the config does not give (``vocab_size``, ``intermediate_size``) leave their
    tensors out, so a caller checks only what is known. ``output.weight`` is listed even for
    tied models: our state dict always has it.

    Raises:
        ValueError: if ``hidden_size``, ``num_hidden_layers`` or ``num_attention_heads`` is
            missing.
    """
    bias = bool(config.get("attention_bias", False))  # HF Llama: q/k/v and o_proj alike
    return common.expected_shapes(
        config,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=False,
        mlp_bias=bool(config.get("mlp_bias", False)),
    )
