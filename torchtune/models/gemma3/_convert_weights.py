# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pure maps between torchtune's Gemma 3 (text) state dicts / configs and Hugging Face's and
PEFT's.

HF's ``Gemma3ForCausalLM`` (``model_type: gemma3_text``) names its modules as Gemma 2 does,
plus ``self_attn.q_norm`` / ``k_norm``: a rename (see the Gemma 2 converter for the norms).

The 4B, 12B and 27B checkpoints are ``Gemma3ForConditionalGeneration`` (``model_type:
gemma3``): the text decoder's settings sit in ``text_config`` and its tensors under a prefix,
next to a vision tower and a projector. Two prefix layouts exist: the files on the hub (and
what transformers 5's ``save_pretrained`` still writes) have ``language_model.model.*``,
``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.*``;
transformers 5's module names (its in-memory ``state_dict``) are ``model.language_model.*``,
``lm_head.weight``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``.
:func:`split_multimodal` takes the decoder out in ``Gemma3ForCausalLM`` keys and leaves the
vision tensors untouched; :func:`join_multimodal` puts them back in the layout they came in,
so a multimodal checkpoint round-trips bit for bit with a fine-tuned decoder inside.
"""

import re
from typing import Any, Dict, Optional, Tuple

from torchtune.models import _hf_common as common
from torchtune.models._hf_common import StateDict, lora_targets_to_hf, tune_to_peft_adapter_config
from torchtune.models.gemma2 import _convert_weights as gemma2

__all__ = [
    "expected_shapes",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "join_multimodal",
    "lora_targets_to_hf",
    "multimodal_peft_adapter_config",
    "multimodal_peft_adapter_weights",
    "peft_to_tune_adapter_weights",
    "split_multimodal",
    "text_config",
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
    :func:`tune_to_peft_adapter_weights` and of :func:`multimodal_peft_adapter_weights`
    (an adapter saved on ``Gemma3ForCausalLM`` or on ``Gemma3ForConditionalGeneration``)."""
    state_dict = {
        (_PEFT_TEXT + k[len(_PEFT_MULTIMODAL) :] if k.startswith(_PEFT_MULTIMODAL) else k): v
        for k, v in state_dict.items()
    }
    return common.peft_to_tune_adapter(state_dict, _HF_TO_TUNE, "Gemma 3")


# ---- the multimodal checkpoints (Gemma3ForConditionalGeneration) -----------------------------
MULTIMODAL_MODEL_TYPE = "gemma3"
# layout -> (prefix of the decoder's ``model.*`` keys, the lm_head key, the vision prefixes)
_LAYOUTS = {
    "hub": (
        "language_model.model.",
        "language_model.lm_head.weight",
        ("vision_tower.", "multi_modal_projector."),
    ),
    "transformers5": (
        "model.language_model.",
        "lm_head.weight",
        ("model.vision_tower.", "model.multi_modal_projector."),
    ),
}
_PEFT_TEXT = "base_model.model.model."
_PEFT_MULTIMODAL = "base_model.model.model.language_model."


def _layout_of(key: str) -> Tuple[Optional[str], bool]:
    """``(layout, is the decoder's)`` of one multimodal key; ``(None, False)`` if unknown."""
    for name, (decoder, lm_head, vision) in _LAYOUTS.items():
        if key.startswith(decoder) or key == lm_head:
            return name, True
        if key.startswith(vision):
            return name, False
    return None, False


def split_multimodal(state_dict: StateDict) -> Tuple[StateDict, StateDict, Optional[str]]:
    """A ``Gemma3ForConditionalGeneration`` state dict (a shard of one) -> ``(the text
    decoder's tensors in Gemma3ForCausalLM keys, the vision tower's and projector's tensors
    as they are, the layout: "hub" or "transformers5", None for an empty dict)``.

    Raises:
        ValueError: on a key of neither layout, or keys of both (which would be ambiguous).
    """
    text: StateDict = {}
    rest: StateDict = {}
    layouts = set()
    for key, value in state_dict.items():
        layout, is_text = _layout_of(key)
        if layout is None:
            raise ValueError(
                f"Unexpected key '{key}' in a Gemma 3 multimodal checkpoint: expected the "
                "language model under 'language_model.model.' / 'model.language_model.' and "
                "the vision tower / projector under 'vision_tower.' / 'multi_modal_projector.'"
                " (optionally behind 'model.')"
            )
        layouts.add(layout)
        if is_text:
            decoder, lm_head, _ = _LAYOUTS[layout]
            text["lm_head.weight" if key == lm_head else "model." + key[len(decoder) :]] = value
        else:
            rest[key] = value
    if len(layouts) > 1:
        raise ValueError(
            "A Gemma 3 multimodal checkpoint mixes the hub's key layout ('language_model.model.',"
            " 'vision_tower.') with transformers 5's ('model.language_model.', "
            "'model.vision_tower.'); expected one"
        )
    return text, rest, (layouts.pop() if layouts else None)


def join_multimodal(text: StateDict, rest: StateDict, layout: str) -> StateDict:
    """Inverse of :func:`split_multimodal`: Gemma3ForCausalLM keys back under ``layout``'s
    prefixes, the vision tensors ``rest`` added as they are (tensors shared).

    Raises:
        ValueError: on an unknown layout or a key that is not the decoder's.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"Unknown Gemma 3 multimodal layout '{layout}'; one of {sorted(_LAYOUTS)}")
    decoder, lm_head, _ = _LAYOUTS[layout]
    out: StateDict = {}
    for key, value in text.items():
        if key == "lm_head.weight":
            out[lm_head] = value
        elif key.startswith("model."):
            out[decoder + key[len("model.") :]] = value
        else:
            raise ValueError(f"Unexpected key '{key}' in a Gemma 3 text decoder state dict")
    return {**out, **rest}


def multimodal_peft_adapter_weights(state_dict: StateDict) -> StateDict:
    """torchtune LoRA keys -> PEFT keys of an adapter on ``Gemma3ForConditionalGeneration``
    (its modules are ``model.language_model.layers.N...`` and ``lm_head``)."""
    out = {}
    for key, value in tune_to_peft_adapter_weights(state_dict).items():
        if key.startswith(_PEFT_TEXT):
            key = _PEFT_MULTIMODAL + key[len(_PEFT_TEXT) :]
        out[key] = value
    return out


def multimodal_peft_adapter_config(
    adapter_config: Dict[str, Any], base_model_name_or_path: Optional[str] = None
) -> Dict[str, Any]:
    """PEFT's ``adapter_config.json`` for an adapter on ``Gemma3ForConditionalGeneration``:
    ``target_modules`` is a regex over the language model's modules, since the vision tower
    has ``q_proj`` / ``k_proj`` / ``v_proj`` too and a name list would adapt those as well."""
    config = tune_to_peft_adapter_config(adapter_config, base_model_name_or_path)
    names = [re.escape(n) for n in config["target_modules"] if n != "lm_head"]
    patterns = []
    if names:
        patterns.append(r"model\.language_model\.layers\.\d+\..*\.(" + "|".join(names) + ")")
    if "lm_head" in config["target_modules"]:
        patterns.append("lm_head")
    config["target_modules"] = "|".join(f"(?:{p})" for p in patterns)
    return config


# Gemma3TextConfig's defaults (transformers 5): the hub's multimodal config.json lists only the
# text_config fields that differ from them (4B: hidden_size, intermediate_size,
# num_hidden_layers, rope_scaling, sliding_window).
_TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}


def text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The text decoder's ``config.json`` dict: ``config`` itself for ``gemma3_text``; for a
    multimodal ``gemma3`` one its ``text_config`` with Gemma3TextConfig's defaults filled in
    and the top level's ``tie_word_embeddings`` (the key transformers reads there).

    Raises:
        ValueError: if a ``gemma3`` config has no ``text_config`` object, or it is not
            ``gemma3_text``.
    """
    if config.get("model_type") != MULTIMODAL_MODEL_TYPE:
        return config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(
            f"config.json has model_type '{MULTIMODAL_MODEL_TYPE}' but text_config={text!r}; "
            "expected the language model's settings there"
        )
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(
            f"config.json's text_config has model_type '{text['model_type']}'; the gemma3 "
            "family reads a 'gemma3_text' language model"
        )
    return {
        **_TEXT_DEFAULTS,
        **text,
        "model_type": "gemma3_text",
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", True)),
    }


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
    """HF ``config.json`` contents (the hub's or transformers 5's layout; ``gemma3_text``, or
    a multimodal ``gemma3`` one, read through :func:`text_config`) -> :func:`gemma3` keyword
    arguments, so that ``gemma3(**kwargs)`` computes what ``Gemma3ForCausalLM`` does (and the
    language model of ``Gemma3ForConditionalGeneration`` on text).

    Raises:
        ValueError: on a missing size or a setting not implemented (RoPE other than default /
            linear, attention soft-capping, MoE keys, ``quantization_config``, an activation
            other than ``gelu_pytorch_tanh``, bidirectional attention, inconsistent
            ``layer_types``), naming the key and value.
    """
    config = text_config(config)
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
    layer); of the text decoder for a multimodal ``gemma3`` config."""
    return gemma2.gemma_expected_shapes(text_config(config), qk_norm=True)
