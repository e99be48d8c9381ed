# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pure maps between torchtune's LoRA adapter keys/config and PEFT's (for HF ``LlamaForCausalLM``).

torchtune: ``layers.0.attn.q_proj.lora_a.weight`` ([r, in]) and ``...lora_b.weight`` ([out, r]).
PEFT:      ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` and ``...lora_B...``.

HF permutes the rows of q_proj/k_proj (see ``_convert_weights``). The adapter's update
``B @ A`` lives in the same row space as the base weight, so only ``lora_b`` of q/k needs the
row permutation; ``lora_a`` (the input side) is unchanged.
"""

from typing import Any, Dict, Iterable, List, Optional

import torch

from torchtune.models.llama2._convert_weights import (
    _HF_TO_TUNE,
    _map_key,
    _permute,
    _unpermute,
)

_PEFT_PREFIX = "base_model.model."

# torchtune module names -> HF module names, as PEFT's ``target_modules`` wants them.
_TARGET_TO_HF = {
    "q_proj": ["q_proj"],
    "k_proj": ["k_proj"],
    "v_proj": ["v_proj"],
    "output_proj": ["o_proj"],
    "w1": ["gate_proj"],
    "w2": ["down_proj"],
    "w3": ["up_proj"],
    # lora_llama2(apply_lora_to_mlp=True) adapts all three MLP projections.
    "mlp": ["gate_proj", "down_proj", "up_proj"],
    "output": ["lm_head"],
}
_TUNE_SUFFIX = {"lora_a": "lora_A", "lora_b": "lora_B"}
_PEFT_SUFFIX = {v: k for k, v in _TUNE_SUFFIX.items()}


def _split_lora_key(key: str, suffixes: Iterable[str]):
    for s in suffixes:
        tail = f".{s}.weight"
        if key.endswith(tail):
            return key[: -len(tail)], s
    return None, None


def tune_to_peft_adapter_weights(
    state_dict: Dict[str, torch.Tensor], num_heads: int, num_kv_heads: int
) -> Dict[str, torch.Tensor]:
    """torchtune adapter keys -> PEFT ``adapter_model.safetensors`` keys.

    Args:
        state_dict: ``{"layers.0.attn.q_proj.lora_a.weight": [r, in], ...lora_b: [out, r]}``.
        num_heads: query heads (for the q_proj ``lora_b`` row permutation).
        num_kv_heads: key/value heads (for k_proj's).

    Returns:
        A new dict with PEFT keys; q/k ``lora_b`` are new tensors, others are shared.

    Raises:
        ValueError: on a key that is not a LoRA weight of a known Llama2 module.
    """
    inverse = {v: k for k, v in _HF_TO_TUNE.items()}
    out = {}
    for key, value in state_dict.items():
        module, which = _split_lora_key(key, _TUNE_SUFFIX)
        if module is None:
            raise ValueError(f"Unexpected key '{key}' in a torchtune LoRA adapter state dict")
        hf_module = _map_key(module + ".weight", inverse, "torchtune")[: -len(".weight")]
        if which == "lora_b" and module.endswith("attn.q_proj"):
            value = _permute(value, num_heads)
        elif which == "lora_b" and module.endswith("attn.k_proj"):
            value = _permute(value, num_kv_heads)
        out[f"{_PEFT_PREFIX}{hf_module}.{_TUNE_SUFFIX[which]}.weight"] = value
    return out


def peft_to_tune_adapter_weights(
    state_dict: Dict[str, torch.Tensor], num_heads: int, num_kv_heads: int
) -> Dict[str, torch.Tensor]:
    """PEFT adapter keys -> torchtune adapter keys. Inverse of ``tune_to_peft_adapter_weights``.

    Args:
        state_dict: PEFT ``adapter_model.safetensors`` contents.
        num_heads: query heads.
        num_kv_heads: key/value heads.

    Returns:
        A new dict with torchtune keys.

    Raises:
        ValueError: on a key that is not a PEFT LoRA weight of a known Llama module.
    """
    out = {}
    for key, value in state_dict.items():
        module, which = _split_lora_key(key, _PEFT_SUFFIX)
        if module is None or not module.startswith(_PEFT_PREFIX):
            raise ValueError(f"Unexpected key '{key}' in a PEFT LoRA adapter state dict")
        hf_module = module[len(_PEFT_PREFIX) :]
        tune_module = _map_key(hf_module + ".weight", _HF_TO_TUNE, "PEFT")[: -len(".weight")]
        if which == "lora_B" and tune_module.endswith("attn.q_proj"):
            value = _unpermute(value, num_heads)
        elif which == "lora_B" and tune_module.endswith("attn.k_proj"):
            value = _unpermute(value, num_kv_heads)
        out[f"{tune_module}.{_PEFT_SUFFIX[which]}.weight"] = value
    return out


def tune_to_peft_adapter_config(
    adapter_config: Dict[str, Any], base_model_name_or_path: Optional[str] = None
) -> Dict[str, Any]:
    """Our ``{"r", "lora_alpha", "target_modules"}`` -> a PEFT ``adapter_config.json`` dict.

    Args:
        adapter_config: ``r`` (rank), ``lora_alpha`` and ``target_modules`` in torchtune names
            (``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``, ``w1``/``w2``/``w3`` or ``mlp``,
            ``output``).
        base_model_name_or_path: the HF base model (a hub id or local folder) the adapter was
            trained on; lets ``AutoPeftModelForCausalLM.from_pretrained`` find it.

    Returns:
        A dict ``peft.LoraConfig`` accepts (``peft_type`` LORA, HF module names).

    Raises:
        ValueError: if a field is missing or a target module is unknown.
    """
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in adapter_config]
    if missing:
        raise ValueError(f"adapter_config lacks {missing}; got keys {sorted(adapter_config)}")
    targets: List[str] = []
    for name in adapter_config["target_modules"]:
        if name not in _TARGET_TO_HF:
            raise ValueError(
                f"Unknown LoRA target module '{name}'; expected one of {sorted(_TARGET_TO_HF)}"
            )
        targets += [t for t in _TARGET_TO_HF[name] if t not in targets]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(adapter_config["r"]),
        "lora_alpha": adapter_config["lora_alpha"],
        "lora_dropout": float(adapter_config.get("lora_dropout", 0.0)),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
