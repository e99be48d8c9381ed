# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pure maps between torchtune's Gemma 3 (text) state dicts / configs and Hugging Face's and
PEFT's.

HF's ``Gemma3ForCausalLM`` (``model_type: gemma3_text``) names its modules as Gemma 2 does,
plus ``self_attn.q_norm`` / ``k_norm``: a rename (see the Gemma 2 converter for the norms).
"""

from typing import Any, Dict, Optional, Tuple

from torchtune.models import _hf_common as common
from torchtune.models._hf_common import StateDict, lora_targets_to_hf, tune_to_peft_adapter_config
from torchtune.models.gemma2 import _convert_weights as gemma2

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

# Read at call time, so a test can swap two entries and see the parity tests fail.
_HF_TO_TUNE = gemma2.gemma_key_map(qk_norm=True)


def _inverse(mapping: Dict[str, str]) -> Dict[str, str]:
    return {v: k for k, v in mapping.items()}


def hf_to_tune(state_dict: StateDict) -> StateDict:
    """HF ``Gemma3ForCausalLM`` keys -> torchtune keys (tensors shared).

    Raises:
        ValueError: on a key that is not part of an HF Gemma 3 text checkpoint.
    """
    return common.rename(state_dict, _HF_TO_TUNE, "Hugging Face Gemma 3")


def tune_to_hf(state_dict: StateDict) -> StateDict:
    """torchtune keys -> HF keys; inverse of :func:`hf_to_tune`."""
    return common.rename(state_dict, _inverse(_HF_TO_TUNE), "torchtune Gemma 3")


def tune_to_peft_adapter_weights(state_dict: StateDict) -> StateDict:
    """torchtune LoRA keys -> PEFT ``adapter_model.safetensors`` keys (tensors shared)."""
    return common.tune_to_peft_adapter(state_dict, _inverse(_HF_TO_TUNE), "Gemma 3")


def peft_to_tune_adapter_weights(state_dict: StateDict) -> StateDict:
    """PEFT adapter keys -> torchtune LoRA keys; inverse of
    :func:`tune_to_peft_adapter_weights`."""
    return common.peft_to_tune_adapter(state_dict, _HF_TO_TUNE, "Gemma 3")


# rope types the rotary module implements for Gemma 3's layers, and the keys each reads.
_ROPE_KEYS = {"default": (), "linear": ("factor",)}


def _rope(params: Optional[Dict[str, Any]], key: str) -> Optional[Dict[str, Any]]:
    """A rope dict of the config -> our ``scaling`` (None for the default rotary embedding).

    Raises:
        ValueError: on a rope type other than default / linear, or a missing factor.
    """
    params = params or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _ROPE_KEYS:
        raise ValueError(
            f"config.json has {key} with rope_type '{rope_type}'; the gemma3 family implements "
            f"{sorted(_ROPE_KEYS)}"
        )
    if rope_type == "default":
        return None
    if params.get("factor") is None:
        raise ValueError(f"config.json has {key} of rope_type '{rope_type}' without 'factor'")
    return {"rope_type": rope_type, "factor": float(params["factor"])}


def _rotary(config: Dict[str, Any]) -> Dict[str, Any]:
    """RoPE kwargs of the global (full) and local (sliding) layers, from either layout:
    transformers 5's ``rope_parameters: {full_attention: {...}, sliding_attention: {...}}``
    or the hub's ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` (global only)."""
    params = config.get("rope_parameters")
    if params and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        sliding = params.get("sliding_attention") or {}
        key = "rope_parameters"
        return {
            "rope_base": float(full.get("rope_theta", 1_000_000.0)),
            "rope_scaling": _rope(full, f"{key}.full_attention"),
            "rope_local_base": float(sliding.get("rope_theta", 10_000.0)),
            "rope_local_scaling": _rope(sliding, f"{key}.sliding_attention"),
        }
    if params:  # one flat dict: not a layout transformers writes for Gemma 3
        raise ValueError(
            f"config.json has rope_parameters {params} without 'full_attention' / "
            "'sliding_attention' entries; the gemma3 family needs one per layer type"
        )
    return {
        "rope_base": float(config.get("rope_theta", 1_000_000.0)),
        "rope_scaling": _rope(config.get("rope_scaling"), "rope_scaling"),
        "rope_local_base": float(config.get("rope_local_base_freq", 10_000.0)),
        "rope_local_scaling": None,
    }


def hf_config_to_builder_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """HF ``config.json`` contents (the hub's or transformers 5's layout) -> :func:`gemma3`
    keyword arguments, so that ``gemma3(**kwargs)`` computes what ``Gemma3ForCausalLM`` does.

    Raises:
        ValueError: on a missing size or a setting not implemented (RoPE other than default /
            linear, attention soft-capping, MoE keys, ``quantization_config``, an activation
            other than ``gelu_pytorch_tanh``, bidirectional attention, inconsistent
            ``layer_types``), naming the key and value.
    """
    gemma2.refuse_unsupported(config, "gemma3")
    if config.get("attn_logit_softcapping") is not None:
        # Gemma3ForCausalLM reads the value but never applies it: refuse rather than guess.
        raise ValueError(
            f"config.json has attn_logit_softcapping={config['attn_logit_softcapping']}; "
            "Gemma 3's attention is not soft-capped (set it to null)"
        )
    final = config.get("final_logit_softcapping")
    return {
        **gemma2.gemma_common_kwargs(config, max_positions=131_072),
        **_rotary(config),
        "final_softcap": float(final) if final is not None else None,
        # Hub files give the pattern as an int (sliding_window_pattern, default 6).
        "sliding_window": gemma2.layer_windows(
            config, period=int(config.get("sliding_window_pattern") or 6), family="gemma3"
        ),
    }


def expected_shapes(config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Native-key tensor shapes of a Gemma 3 text ``config.json`` (q/k norms, four norms per
    layer)."""
    return gemma2.gemma_expected_shapes(config, qk_norm=True)
