# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pure maps between torchtune's Qwen2 state dicts / configs and Hugging Face's and PEFT's.

HF's ``Qwen2ForCausalLM`` has Llama's module names and our rotary layout: a rename.
"""

from typing import Any, Dict, Tuple

from torchtune.models import _hf_common as common
from torchtune.models._hf_common import StateDict, lora_targets_to_hf, tune_to_peft_adapter_config

_HF_TO_TUNE = common.hf_key_map(qk_norm=False)
_TUNE_TO_HF = {v: k for k, v in _HF_TO_TUNE.items()}

__all__ = [
    "expected_shapes",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "lora_targets_to_hf",
    "peft_to_tune_adapter_weights",
    "tune_to_hf",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]


def hf_to_tune(state_dict: StateDict) -> StateDict:
    """HF ``Qwen2ForCausalLM`` keys -> torchtune keys (tensors shared; ``inv_freq`` dropped).

    Raises:
        ValueError: on a key that is not part of an HF Qwen2 checkpoint.
    """
    return common.rename(state_dict, _HF_TO_TUNE, "Hugging Face Qwen2")


def tune_to_hf(state_dict: StateDict) -> StateDict:
    """torchtune keys -> HF keys; inverse of :func:`hf_to_tune`."""
    return common.rename(state_dict, _TUNE_TO_HF, "torchtune Qwen2")


def tune_to_peft_adapter_weights(state_dict: StateDict) -> StateDict:
    """torchtune LoRA keys -> PEFT ``adapter_model.safetensors`` keys (tensors shared)."""
    return common.tune_to_peft_adapter(state_dict, _TUNE_TO_HF, "Qwen2")


def peft_to_tune_adapter_weights(state_dict: StateDict) -> StateDict:
    """PEFT adapter keys -> torchtune LoRA keys; inverse of
    :func:`tune_to_peft_adapter_weights`."""
    return common.peft_to_tune_adapter(state_dict, _HF_TO_TUNE, "Qwen2")


def hf_config_to_builder_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """HF ``config.json`` contents (the hub's or transformers 5's layout) -> :func:`qwen2`
    keyword arguments, so that ``qwen2(**kwargs)`` computes what ``Qwen2ForCausalLM`` does.

    Raises:
        ValueError: on a missing size or a setting not implemented (scaled RoPE, MoE keys,
            ``quantization_config``, ``hidden_act`` other than SiLU, inconsistent
            ``layer_types``), naming the key and value.
    """
    common.refuse_unsupported(config, "qwen2")
    heads = int(common.require(config, "num_attention_heads"))
    windows = common.qwen_layer_windows(config, "qwen2")
    return {
        "vocab_size": int(common.require(config, "vocab_size")),
        "num_layers": int(common.require(config, "num_hidden_layers")),
        "num_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "embed_dim": int(common.require(config, "hidden_size")),
        "intermediate_dim": int(common.require(config, "intermediate_size")),
        "max_seq_len": int(common.require(config, "max_position_embeddings")),
        "attn_dropout": float(config.get("attention_dropout", 0.0)),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_base": common.rope_theta(config, 10_000.0),
        "head_dim": config.get("head_dim"),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "sliding_window": windows,
    }


def expected_shapes(config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Native-key tensor shapes of a Qwen2 ``config.json`` (q/k/v biases, no o_proj bias)."""
    return common.expected_shapes(config, qkv_bias=True, o_bias=False, qk_norm=False)
