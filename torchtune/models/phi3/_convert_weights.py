# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pure maps between torchtune's Phi-3 / Phi-4 state dicts / configs and HF's and PEFT's.

HF's ``Phi3ForCausalLM`` fuses q, k and v into ``self_attn.qkv_proj`` (rows q, k, v) and the
MLP's gate and up projections into ``mlp.gate_up_proj`` (gate rows first). Our Phi-3 model
keeps both fused (``attn.qkv_proj``, ``mlp.w13``), so a checkpoint converts by renaming keys,
saves back fused bit for bit, and a LoRA adapter on a fused projection is exactly PEFT's
adapter on ``qkv_proj`` / ``gate_up_proj`` (one ``lora_A``, one ``lora_B``). Its rotary
layout is HF's halves, as ours.
"""

from typing import Any, Dict, Optional, Tuple

from torchtune.models import _hf_common as common
from torchtune.models._hf_common import StateDict
from torchtune.modules.position_embeddings import longrope_attention_factor

_HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.self_attn.qkv_proj.weight": "layers.{}.attn.qkv_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.mlp.gate_up_proj.weight": "layers.{}.mlp.w13.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
}
_TUNE_TO_HF = {v: k for k, v in _HF_TO_TUNE.items()}

# torchtune LoRA target names -> the HF module names PEFT's ``target_modules`` wants.
TARGET_TO_HF = {
    "qkv_proj": ["qkv_proj"],
    "output_proj": ["o_proj"],
    "w13": ["gate_up_proj"],
    "w2": ["down_proj"],
    "mlp": ["gate_up_proj", "down_proj"],  # apply_lora_to_mlp=True adapts both
    "output": ["lm_head"],
}

_ROPE_TYPES = {None: None, "default": None, "longrope": "longrope"}
# transformers' Phi3Config reads these older names as longrope (its back-compat rule).
_ROPE_TYPES.update(su="longrope", yarn="longrope")
# Phi3Config fields with no counterpart here: refused when set to anything but off.
_OFF = {
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attention_bias": False,
    "mlp_bias": False,
    "lm_head_bias": False,
}

__all__ = [
    "TARGET_TO_HF",
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
    """HF ``Phi3ForCausalLM`` keys -> torchtune keys (tensors shared, fused projections kept
    fused; ``inv_freq`` dropped).

    Raises:
        ValueError: on a key that is not part of an HF Phi-3 checkpoint.
    """
    return common.rename(state_dict, _HF_TO_TUNE, "Hugging Face Phi-3")


def tune_to_hf(state_dict: StateDict) -> StateDict:
    """torchtune keys -> HF keys; inverse of :func:`hf_to_tune`."""
    return common.rename(state_dict, _TUNE_TO_HF, "torchtune Phi-3")


def tune_to_peft_adapter_weights(state_dict: StateDict) -> StateDict:
    """torchtune LoRA keys -> PEFT ``adapter_model.safetensors`` keys (tensors shared):
    ``layers.0.attn.qkv_proj.lora_a.weight`` ->
    ``base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight``."""
    return common.tune_to_peft_adapter(state_dict, _TUNE_TO_HF, "Phi-3")


def peft_to_tune_adapter_weights(state_dict: StateDict) -> StateDict:
    """PEFT adapter keys -> torchtune LoRA keys; inverse of
    :func:`tune_to_peft_adapter_weights`."""
    return common.peft_to_tune_adapter(state_dict, _HF_TO_TUNE, "Phi-3")


def lora_targets_to_hf(target_modules):
    """torchtune LoRA targets (``qkv_proj``, ``output_proj``, ``w13``, ``w2`` or ``mlp``,
    ``output``) -> PEFT's module names (``qkv_proj``, ``o_proj``, ``gate_up_proj`` ...).

    Raises:
        ValueError: on an unknown name (``q_proj`` included: Phi-3 has none).
    """
    return common.lora_targets_to_hf(target_modules, TARGET_TO_HF)


def tune_to_peft_adapter_config(
    adapter_config: Dict[str, Any], base_model_name_or_path: Optional[str] = None
) -> Dict[str, Any]:
    """Our adapter config -> PEFT's ``adapter_config.json`` dict, in Phi-3's module names."""
    return common.tune_to_peft_adapter_config(adapter_config, base_model_name_or_path, TARGET_TO_HF)


def _rope_params(config: Dict[str, Any]) -> Dict[str, Any]:
    """The rotary settings in either layout: the hub's ``rope_scaling`` (which wins when both
    are set, as in ``Phi3Config``), else transformers 5's ``rope_parameters``."""
    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key)
        if params:
            return {"key": key, **params}
    return {"key": "rope_scaling"}


def _longrope(
    params: Dict[str, Any], config: Dict[str, Any], rotary_dim: int, max_pos: int
) -> Dict[str, Any]:
    """:class:`PartialRotaryPositionalEmbeddings`' ``longrope`` dict, as transformers'
    ``_compute_longrope_parameters`` reads the config."""
    missing = [k for k in ("short_factor", "long_factor") if not params.get(k)]
    if missing:
        raise ValueError(f"config.json has {params['key']} of rope_type longrope without {missing}")
    for k in ("short_factor", "long_factor"):
        if len(params[k]) != rotary_dim // 2:
            raise ValueError(
                f"config.json has {params['key']}.{k} of {len(params[k])} entries; the rotary "
                f"dimension {rotary_dim} needs {rotary_dim // 2}"
            )
    original = int(
        params.get("original_max_position_embeddings")
        or config.get("original_max_position_embeddings")
        or 4096  # Phi3Config's default
    )
    factor = params.get("factor")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        # transformers: the factor given, else the context extension from the two lengths.
        factor = max_pos / original if factor is None else float(factor)
        attention_factor = longrope_attention_factor(factor, original)
    return {
        "short_factor": [float(f) for f in params["short_factor"]],
        "long_factor": [float(f) for f in params["long_factor"]],
        "original_max_position_embeddings": original,
        "attention_factor": float(attention_factor),
    }


def hf_config_to_builder_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """HF ``config.json`` contents (the hub's or transformers 5's layout) -> :func:`phi3`
    keyword arguments, so that ``phi3(**kwargs)`` computes what ``Phi3ForCausalLM`` does.

    Read: sizes, ``head_dim`` (else ``hidden_size // num_attention_heads``),
    ``partial_rotary_factor`` (top level or in ``rope_parameters``), ``rope_theta``,
    ``rope_scaling`` / ``rope_parameters`` of type ``longrope`` (``su`` / ``yarn`` too, which
    transformers reads as longrope) with its factor lists, ``original_max_position_embeddings``
    and optional ``factor`` / ``attention_factor``, ``sliding_window`` (every layer),
    ``tie_word_embeddings``, ``pad_token_id`` (the embedding row that gets no gradient, as in
    HF's ``nn.Embedding(padding_idx=pad_token_id)``).

    Raises:
        ValueError: on a missing size or a setting not implemented, naming the key and value:
            another rope type, non-zero ``resid_pdrop`` / ``embd_pdrop``, biases, another
            ``hidden_act``, MoE keys, ``quantization_config``, ``layer_types`` that disagree
            with ``sliding_window`` (``Phi3ForCausalLM`` windows every layer or none), a
            ``pad_token_id`` outside the vocabulary.
    """
    for key, off in _OFF.items():
        if config.get(key, off) not in (off, None):
            raise ValueError(
                f"config.json has {key}={config[key]}; the phi3 family implements only {key}={off}"
            )
    params = _rope_params(config)
    raw_type = params.get("rope_type") or params.get("type")
    if raw_type not in _ROPE_TYPES:
        raise ValueError(
            f"config.json has {params['key']} with rope_type '{raw_type}'; the phi3 family "
            "implements the default rotary embedding and 'longrope'"
        )
    # refuse_unsupported knows only the default rope: let it check everything else.
    common.refuse_unsupported(
        {k: v for k, v in config.items() if k not in ("rope_parameters", "rope_scaling")}, "phi3"
    )
    heads = int(common.require(config, "num_attention_heads"))
    dim = int(common.require(config, "hidden_size"))
    head_dim = int(config.get("head_dim") or dim // heads)
    layers = int(common.require(config, "num_hidden_layers"))
    max_pos = int(common.require(config, "max_position_embeddings"))
    factor = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * factor)  # transformers truncates the same way
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(
            f"config.json has partial_rotary_factor={factor}: head_dim {head_dim} * "
            f"{factor} = {rotary_dim} rotated channels, which must be even and in (0, head_dim]"
        )
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types is not None:
        want = "sliding_attention" if window is not None else "full_attention"
        if list(types) != [want] * layers:
            raise ValueError(
                f"config.json has layer_types {types} with sliding_window={window}; "
                f"Phi3ForCausalLM applies the window to every layer or none ({want} x {layers})"
            )
    vocab = int(common.require(config, "vocab_size"))
    pad = config.get("pad_token_id")
    if pad is not None and not 0 <= int(pad) < vocab:
        raise ValueError(
            f"config.json has pad_token_id={pad} outside the vocabulary of {vocab} "
            "(transformers' embedding refuses it too)"
        )
    longrope = None
    if _ROPE_TYPES[raw_type] == "longrope":
        longrope = _longrope(params, config, rotary_dim, max_pos)
    return {
        "vocab_size": vocab,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "embed_dim": dim,
        "intermediate_dim": int(common.require(config, "intermediate_size")),
        "max_seq_len": max_pos,
        "attn_dropout": float(config.get("attention_dropout", 0.0)),
        "norm_eps": float(config.get("rms_norm_eps", 1e-5)),
        # Phi3Config: the rope dict's rope_theta, else the top-level one.
        "rope_base": float(params.get("rope_theta", config.get("rope_theta", 10_000.0))),
        "head_dim": config.get("head_dim"),
        "rotary_dim": rotary_dim,
        "longrope": longrope,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "sliding_window": int(window) if window is not None else None,
        "padding_idx": int(pad) if pad is not None else None,
    }


def expected_shapes(config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Native-key tensor shapes of a Phi-3 ``config.json`` (fused q/k/v and gate/up, no
    biases). Sizes the config does not give leave their tensors out; ``output.weight`` is
    listed for tied models too (our state dict has it).

    Raises:
        ValueError: if ``hidden_size``, ``num_hidden_layers`` or ``num_attention_heads`` is
            missing.
    """
    dim = int(common.require(config, "hidden_size"))
    heads = int(common.require(config, "num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or dim // heads)
    vocab, hidden = config.get("vocab_size"), config.get("intermediate_size")
    shapes: Dict[str, Tuple[int, ...]] = {"norm.scale": (dim,)}
    if vocab:
        shapes["tok_embeddings.weight"] = (vocab, dim)
        shapes["output.weight"] = (vocab, dim)
    for i in range(int(common.require(config, "num_hidden_layers"))):
        p = f"layers.{i}."
        shapes[p + "attn.qkv_proj.weight"] = ((heads + 2 * kv_heads) * head_dim, dim)
        shapes[p + "attn.output_proj.weight"] = (dim, heads * head_dim)
        shapes[p + "sa_norm.scale"] = (dim,)
        shapes[p + "mlp_norm.scale"] = (dim,)
        if hidden:
            shapes[p + "mlp.w13.weight"] = (2 * int(hidden), dim)
            shapes[p + "mlp.w2.weight"] = (dim, int(hidden))
    return shapes
