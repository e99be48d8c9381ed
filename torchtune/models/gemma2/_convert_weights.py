# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pure maps between torchtune's Gemma 2 state dicts / configs and Hugging Face's and PEFT's.

HF's ``Gemma2ForCausalLM`` has Llama's projection names and our rotary layout, and four norms
per layer where Llama has two. Beware the one name they share: Gemma's
``post_attention_layernorm`` normalises the attention *output* (our ``post_attn_norm``), while
Llama's is the norm before the MLP (our ``mlp_norm``, Gemma's ``pre_feedforward_layernorm``).
The norm weights are stored as they are (zero-centred; :class:`GemmaRMSNorm` adds the one).
The helpers here serve Gemma 3's converter too.
"""

from typing import Any, Dict, List, Optional, Tuple

from torchtune.models import _hf_common as common
from torchtune.models._hf_common import StateDict, lora_targets_to_hf, tune_to_peft_adapter_config
from torchtune.models.gemma2._component_builders import alternating_windows

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


def gemma_key_map(qk_norm: bool) -> Dict[str, str]:
    """HF -> torchtune keys of a Gemma 2 / 3 decoder (``{}`` = layer index)."""
    mapping = common.hf_key_map(qk_norm=qk_norm)
    layer = "model.layers.{}."
    mapping[layer + "post_attention_layernorm.weight"] = "layers.{}.post_attn_norm.scale"
    mapping[layer + "pre_feedforward_layernorm.weight"] = "layers.{}.mlp_norm.scale"
    mapping[layer + "post_feedforward_layernorm.weight"] = "layers.{}.post_mlp_norm.scale"
    return mapping


# Read at call time, so a test can swap two entries and see the parity tests fail.
_HF_TO_TUNE = gemma_key_map(qk_norm=False)


def _inverse(mapping: Dict[str, str]) -> Dict[str, str]:
    return {v: k for k, v in mapping.items()}


def hf_to_tune(state_dict: StateDict) -> StateDict:
    """HF ``Gemma2ForCausalLM`` keys -> torchtune keys (tensors shared).

    Raises:
        ValueError: on a key that is not part of an HF Gemma 2 checkpoint.
    """
    return common.rename(state_dict, _HF_TO_TUNE, "Hugging Face Gemma 2")


def tune_to_hf(state_dict: StateDict) -> StateDict:
    """torchtune keys -> HF keys; inverse of :func:`hf_to_tune`."""
    return common.rename(state_dict, _inverse(_HF_TO_TUNE), "torchtune Gemma 2")


def tune_to_peft_adapter_weights(state_dict: StateDict) -> StateDict:
    """torchtune LoRA keys -> PEFT ``adapter_model.safetensors`` keys (tensors shared)."""
    return common.tune_to_peft_adapter(state_dict, _inverse(_HF_TO_TUNE), "Gemma 2")


def peft_to_tune_adapter_weights(state_dict: StateDict) -> StateDict:
    """PEFT adapter keys -> torchtune LoRA keys; inverse of
    :func:`tune_to_peft_adapter_weights`."""
    return common.peft_to_tune_adapter(state_dict, _HF_TO_TUNE, "Gemma 2")


# ---- config.json -----------------------------------------------------------------------------
_ACTIVATION = "gelu_pytorch_tanh"


def refuse_unsupported(config: Dict[str, Any], family: str) -> None:
    """Raise on what neither Gemma builder implements: another activation, MLP biases,
    bidirectional attention, MoE layers, quantized weights.

    Raises:
        ValueError: naming the key and its value.
    """
    # transformers' Gemma reads hidden_activation only (the hub's files also carry hidden_act).
    act = config.get("hidden_activation") or _ACTIVATION
    if act != _ACTIVATION:
        raise ValueError(
            f"config.json has hidden_activation '{act}'; the {family} family is GeGLU with "
            f"'{_ACTIVATION}'"
        )
    if config.get("mlp_bias"):
        raise ValueError(f"config.json has mlp_bias=true; the {family} family has no MLP biases")
    if config.get("use_bidirectional_attention"):
        raise ValueError(
            "config.json has use_bidirectional_attention=true; the "
            f"{family} family implements causal attention only"
        )
    for key in common._MOE_KEYS:
        if config.get(key):
            raise ValueError(
                f"config.json has {key}={config[key]}: mixture-of-experts layers are not "
                f"implemented in the {family} family"
            )
    if config.get("quantization_config"):
        method = config["quantization_config"]
        method = method.get("quant_method", method) if isinstance(method, dict) else method
        raise ValueError(
            f"config.json has quantization_config ({method}); the {family} family loads "
            "unquantized weights only"
        )


def layer_windows(config: Dict[str, Any], period: int, family: str) -> List[Optional[int]]:
    """Per-layer windows, from ``layer_types`` (transformers 5) or, in the hub's files, the
    alternating pattern (every ``period``-th layer global). ``sliding_window`` defaults to
    4096 when absent, as in both config classes.

    Raises:
        ValueError: if ``layer_types`` has the wrong length or an unknown type, or names a
            sliding layer while ``sliding_window`` is null.
    """
    n = int(common.require(config, "num_hidden_layers"))
    window = config.get("sliding_window", 4096)
    types = config.get("layer_types")
    if types is None:
        return alternating_windows(n, int(window) if window else None, period)
    types = list(types)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if len(types) != n or unknown:
        raise ValueError(
            f"config.json has layer_types {types} for {n} layers; the {family} family knows "
            "only 'full_attention' and 'sliding_attention'"
        )
    if "sliding_attention" in types and not window:
        raise ValueError(
            f"config.json has sliding_attention layers in layer_types but sliding_window="
            f"{window}: no window would be applied"
        )
    return [int(window) if t == "sliding_attention" else None for t in types]


def gemma_common_kwargs(config: Dict[str, Any], max_positions: int) -> Dict[str, Any]:
    """Builder kwargs both Gemma families read the same way."""
    heads = int(common.require(config, "num_attention_heads"))
    bias = bool(config.get("attention_bias", False))
    vocab = int(common.require(config, "vocab_size"))
    pad = config.get("pad_token_id", 0)
    if pad is not None and not 0 <= int(pad) < vocab:
        raise ValueError(f"config.json has pad_token_id={pad} outside the vocab_size={vocab}")
    return {
        "vocab_size": vocab,
        "num_layers": int(common.require(config, "num_hidden_layers")),
        "num_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "embed_dim": int(common.require(config, "hidden_size")),
        "intermediate_dim": int(common.require(config, "intermediate_size")),
        "max_seq_len": int(config.get("max_position_embeddings") or max_positions),
        "head_dim": int(config.get("head_dim") or 256),  # both config classes' default
        "attn_dropout": float(config.get("attention_dropout") or 0.0),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "query_pre_attn_scalar": float(config.get("query_pre_attn_scalar", 256)),
        "attn_bias": bias,
        # Both config classes default to tied embeddings; the hub's files leave the key out.
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", True)),
        "padding_idx": int(pad) if pad is not None else None,
    }


def hf_config_to_builder_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """HF ``config.json`` contents (the hub's or transformers 5's layout) -> :func:`gemma2`
    keyword arguments, so that ``gemma2(**kwargs)`` computes what ``Gemma2ForCausalLM`` does.

    Raises:
        ValueError: on a missing size or a setting not implemented (scaled RoPE, MoE keys,
            ``quantization_config``, an activation other than ``gelu_pytorch_tanh``,
            bidirectional attention, inconsistent ``layer_types``), naming the key and value.
    """
    refuse_unsupported(config, "gemma2")
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key) or {}
        rope_type = params.get("rope_type") or params.get("type")
        if rope_type not in (None, "default"):
            raise ValueError(
                f"config.json has {key} with rope_type '{rope_type}'; the gemma2 family "
                "implements only the default (unscaled) rotary embedding"
            )
    return {
        **gemma_common_kwargs(config, max_positions=8192),
        "rope_base": common.rope_theta(config, 10_000.0),
        # Gemma2Config's defaults when absent; null switches a cap off.
        "attn_softcap": _cap(config, "attn_logit_softcapping", 50.0),
        "final_softcap": _cap(config, "final_logit_softcapping", 30.0),
        "sliding_window": layer_windows(config, period=2, family="gemma2"),
    }


def _cap(config: Dict[str, Any], key: str, default: Optional[float]) -> Optional[float]:
    value = config.get(key, default)
    return float(value) if value is not None else None


def gemma_expected_shapes(config: Dict[str, Any], qk_norm: bool) -> Dict[str, Tuple[int, ...]]:
    """Native-key tensor shapes of a Gemma 2 / 3 ``config.json``."""
    bias = bool(config.get("attention_bias", False))
    config = {**config, "head_dim": config.get("head_dim") or 256}
    shapes = common.expected_shapes(config, qkv_bias=bias, o_bias=bias, qk_norm=qk_norm)
    dim = int(common.require(config, "hidden_size"))
    for i in range(int(common.require(config, "num_hidden_layers"))):
        shapes[f"layers.{i}.post_attn_norm.scale"] = (dim,)
        shapes[f"layers.{i}.post_mlp_norm.scale"] = (dim,)
    return shapes


def expected_shapes(config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Native-key tensor shapes of a Gemma 2 ``config.json`` (four norms per layer)."""
    return gemma_expected_shapes(config, qk_norm=False)
