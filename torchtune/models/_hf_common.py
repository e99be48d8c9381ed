# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pieces the Llama-layout HF families (Qwen2, Qwen3, Mistral) share in their converters.

Their HF checkpoints name modules as ``LlamaForCausalLM`` does (``model.layers.N.self_attn.
q_proj``, ``mlp.gate_proj`` ...), plus ``q_norm``/``k_norm`` for Qwen3, and rotate halves as
we do, so a checkpoint converts by renaming keys. Each family's ``_convert_weights`` binds
these to its own key map and config rules; everything here is pure (dicts in, dicts out).
"""

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

# Keys that are not part of any of these families' configs as we implement them; a config
# that sets one is refused rather than silently built as something else.
_MOE_KEYS = (
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
)

# torchtune module names -> HF module names, as PEFT's ``target_modules`` wants them.
TARGET_TO_HF = {
    "q_proj": ["q_proj"],
    "k_proj": ["k_proj"],
    "v_proj": ["v_proj"],
    "output_proj": ["o_proj"],
    "w1": ["gate_proj"],
    "w2": ["down_proj"],
    "w3": ["up_proj"],
    "mlp": ["gate_proj", "down_proj", "up_proj"],  # apply_lora_to_mlp=True adapts all three
    "output": ["lm_head"],
}
_PEFT_PREFIX = "base_model.model."
# Adapter tensors after the module name: ours -> PEFT's (DoRA's magnitude included).
_TUNE_SUFFIX = {
    ".lora_a.weight": ".lora_A.weight",
    ".lora_b.weight": ".lora_B.weight",
    ".magnitude": ".lora_magnitude_vector",
}
_PEFT_SUFFIX = {v: k for k, v in _TUNE_SUFFIX.items()}
_INV_FREQ = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_key_map(qk_norm: bool) -> Dict[str, str]:
    """HF -> torchtune keys (``{}`` = layer index), biases of every projection included.

    A bias that a family's model lacks never appears in its checkpoints, and
    ``load_state_dict`` rejects one that does, so listing all of them costs nothing.
    """
    mapping = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.scale",
        "lm_head.weight": "output.weight",
        "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
        "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
        "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
        "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
        "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    }
    for hf, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj")):
        for p in ("weight", "bias"):
            mapping[f"model.layers.{{}}.self_attn.{hf}.{p}"] = f"layers.{{}}.attn.{ours}.{p}"
    for p in ("weight", "bias"):
        mapping[f"model.layers.{{}}.self_attn.o_proj.{p}"] = f"layers.{{}}.attn.output_proj.{p}"
    if qk_norm:
        for n in ("q_norm", "k_norm"):
            mapping[f"model.layers.{{}}.self_attn.{n}.weight"] = f"layers.{{}}.attn.{n}.scale"
    return mapping


def map_key(key: str, mapping: Dict[str, str], source: str) -> str:
    """Rename one key with a ``{}``-for-layer-index mapping.

    Raises:
        ValueError: naming the key and ``source`` when the mapping does not cover it.
    """
    abstract = re.sub(r"(?<=layers\.)\d+(?=\.)", "{}", key)
    if abstract not in mapping:
        raise ValueError(f"Unexpected key '{key}' in a {source} checkpoint")
    layer = re.search(r"(?<=layers\.)\d+(?=\.)", key)
    return mapping[abstract].format(layer.group(0)) if layer else mapping[abstract]


def rename(state_dict: StateDict, mapping: Dict[str, str], source: str) -> StateDict:
    """Every key renamed (tensors shared); rotary ``inv_freq`` buffers are dropped."""
    return {
        map_key(k, mapping, source): v for k, v in state_dict.items() if not _INV_FREQ.search(k)
    }


def _split_lora_key(key: str, suffixes: Iterable[str]):
    for tail in suffixes:
        if key.endswith(tail):
            return key[: -len(tail)], tail
    return None, None


def tune_to_peft_adapter(
    state_dict: StateDict, tune_to_hf_map: Dict[str, str], family: str
) -> StateDict:
    """torchtune LoRA keys (``layers.0.attn.q_proj.lora_a.weight``, DoRA's ``...q_proj.
    magnitude``) -> PEFT keys (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.
    weight``, ``...q_proj.lora_magnitude_vector``); tensors shared.

    Raises:
        ValueError: on a key that is not a LoRA weight of a known module.
    """
    out = {}
    for key, value in state_dict.items():
        module, which = _split_lora_key(key, _TUNE_SUFFIX)
        if module is None:
            raise ValueError(f"Unexpected key '{key}' in a torchtune {family} LoRA adapter")
        hf = map_key(module + ".weight", tune_to_hf_map, f"torchtune {family}")[: -len(".weight")]
        out[f"{_PEFT_PREFIX}{hf}{_TUNE_SUFFIX[which]}"] = value
    return out


def peft_to_tune_adapter(
    state_dict: StateDict, hf_to_tune_map: Dict[str, str], family: str
) -> StateDict:
    """PEFT adapter keys -> torchtune LoRA keys; inverse of :func:`tune_to_peft_adapter`.

    Raises:
        ValueError: on a key that is not a PEFT LoRA weight of a known module.
    """
    out = {}
    for key, value in state_dict.items():
        module, which = _split_lora_key(key, _PEFT_SUFFIX)
        if module is None or not module.startswith(_PEFT_PREFIX):
            raise ValueError(f"Unexpected key '{key}' in a PEFT {family} LoRA adapter")
        hf = module[len(_PEFT_PREFIX) :]
        ours = map_key(hf + ".weight", hf_to_tune_map, f"PEFT {family}")[: -len(".weight")]
        out[f"{ours}{_PEFT_SUFFIX[which]}"] = value
    return out


def lora_targets_to_hf(
    target_modules: Iterable[str], target_to_hf: Optional[Dict[str, List[str]]] = None
) -> List[str]:
    """torchtune LoRA target names (``q_proj`` ... ``output_proj``, ``w1``-``w3`` or ``mlp``,
    ``output``) -> HF module names in first-seen order, without repeats.

    Args:
        target_modules: torchtune names.
        target_to_hf: the family's name map; :data:`TARGET_TO_HF` (Llama's modules) when None.

    Raises:
        ValueError: on an unknown name.
    """
    target_to_hf = TARGET_TO_HF if target_to_hf is None else target_to_hf
    targets: List[str] = []
    for name in target_modules:
        if name not in target_to_hf:
            raise ValueError(
                f"Unknown LoRA target module '{name}'; expected one of {sorted(target_to_hf)}"
            )
        targets += [t for t in target_to_hf[name] if t not in targets]
    return targets


def tune_to_peft_adapter_config(
    adapter_config: Dict[str, Any],
    base_model_name_or_path: Optional[str] = None,
    target_to_hf: Optional[Dict[str, List[str]]] = None,
) -> Dict[str, Any]:
    """Our ``{"r", "lora_alpha", "target_modules"[, "lora_dropout", "use_dora"]}`` -> a PEFT
    ``adapter_config.json`` dict (HF module names, through ``target_to_hf`` as in
    :func:`lora_targets_to_hf`; ``use_dora`` only when true).

    Raises:
        ValueError: if a field is missing or a target module is unknown.
    """
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in adapter_config]
    if missing:
        raise ValueError(f"adapter_config lacks {missing}; got keys {sorted(adapter_config)}")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(adapter_config["r"]),
        "lora_alpha": adapter_config["lora_alpha"],
        "lora_dropout": float(adapter_config.get("lora_dropout", 0.0)),
        "target_modules": lora_targets_to_hf(adapter_config["target_modules"], target_to_hf),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    if adapter_config.get("use_dora"):
        config["use_dora"] = True
    return config


# ---- config.json -----------------------------------------------------------------------------
def require(config: Dict[str, Any], key: str) -> Any:
    """``config[key]``, or a ValueError naming the key and the keys there are."""
    if key not in config or config[key] is None:
        raise ValueError(f"config.json lacks '{key}'; got keys {sorted(config)}")
    return config[key]


def refuse_unsupported(config: Dict[str, Any], family: str) -> None:
    """Raise on settings none of these families implement: other activations, MLP biases,
    MoE layers, quantized weights, scaled RoPE (``rope_scaling`` / ``rope_parameters``).

    Raises:
        ValueError: naming the key and its value.
    """
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json has hidden_act '{act}'; the {family} family is SiLU")
    if config.get("mlp_bias"):
        raise ValueError(f"config.json has mlp_bias=true; the {family} family has no MLP biases")
    for key in _MOE_KEYS:
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
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key) or {}
        rope_type = params.get("rope_type") or params.get("type")
        if rope_type not in (None, "default"):
            raise ValueError(
                f"config.json has {key} with rope_type '{rope_type}'; the {family} family "
                "implements only the default (unscaled) rotary embedding"
            )


def rope_theta(config: Dict[str, Any], default: float) -> float:
    """RoPE base: transformers 5 nests it in ``rope_parameters``, the hub's files have it on
    top (``rope_theta``)."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", default)))


def expected_shapes(
    config: Dict[str, Any], *, qkv_bias: bool, o_bias: bool, qk_norm: bool, mlp_bias: bool = False
) -> Dict[str, Tuple[int, ...]]:
    """Native-key tensor shapes of the model ``config`` describes.

    Sizes the config does not give (``vocab_size``, ``intermediate_size``) leave their
    tensors out. ``output.weight`` is listed even for tied models: our state dict has it.

    Raises:
        ValueError: if ``hidden_size``, ``num_hidden_layers`` or ``num_attention_heads`` is
            missing.
    """
    dim = int(require(config, "hidden_size"))
    heads = int(require(config, "num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or dim // heads)
    vocab, hidden = config.get("vocab_size"), config.get("intermediate_size")
    shapes: Dict[str, Tuple[int, ...]] = {"norm.scale": (dim,)}
    if vocab:
        shapes["tok_embeddings.weight"] = (vocab, dim)
        shapes["output.weight"] = (vocab, dim)
    for i in range(int(require(config, "num_hidden_layers"))):
        p = f"layers.{i}."
        for name, out_dim, in_dim, bias in (
            ("attn.q_proj", heads * head_dim, dim, qkv_bias),
            ("attn.k_proj", kv_heads * head_dim, dim, qkv_bias),
            ("attn.v_proj", kv_heads * head_dim, dim, qkv_bias),
            ("attn.output_proj", dim, heads * head_dim, o_bias),
        ):
            shapes[p + name + ".weight"] = (out_dim, in_dim)
            if bias:
                shapes[p + name + ".bias"] = (out_dim,)
        if qk_norm:
            shapes[p + "attn.q_norm.scale"] = (head_dim,)
            shapes[p + "attn.k_norm.scale"] = (head_dim,)
        shapes[p + "sa_norm.scale"] = (dim,)
        shapes[p + "mlp_norm.scale"] = (dim,)
        if hidden:
            for name, out_dim, in_dim in (
                ("mlp.w1", hidden, dim),
                ("mlp.w2", dim, hidden),
                ("mlp.w3", hidden, dim),
            ):
                shapes[p + name + ".weight"] = (out_dim, in_dim)
                if mlp_bias:
                    shapes[p + name + ".bias"] = (out_dim,)
    return shapes


def qwen_layer_windows(config: Dict[str, Any], family: str) -> Optional[List[Optional[int]]]:
    """Per-layer sliding windows of a Qwen2/Qwen3 config, as transformers derives them.

    ``sliding_window`` counts only with ``use_sliding_window: true`` (transformers sets it to
    None otherwise). Layers are ``layer_types`` when given (transformers 5), else
    ``"sliding_attention"`` from layer ``max_window_layers`` on.

    Returns:
        None when no layer has a window, else one entry per layer (the window or None).

    Raises:
        ValueError: if ``layer_types`` has the wrong length or an unknown type, or names a
            sliding layer while no window applies.
    """
    n = int(require(config, "num_hidden_layers"))
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    types = config.get("layer_types")
    if types is None:
        first = int(config.get("max_window_layers", 28))  # transformers' default
        types = [
            "sliding_attention" if window and i >= first else "full_attention" for i in range(n)
        ]
    types = list(types)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if len(types) != n or unknown:
        raise ValueError(
            f"config.json has layer_types {types} for {n} layers; the {family} family knows "
            "only 'full_attention' and 'sliding_attention'"
        )
    if "sliding_attention" not in types:
        return None
    if not window:
        raise ValueError(
            f"config.json has sliding_attention layers in layer_types but sliding_window="
            f"{config.get('sliding_window')} with use_sliding_window="
            f"{config.get('use_sliding_window')}: no window would be applied"
        )
    return [int(window) if t == "sliding_attention" else None for t in types]
