# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Which model family a checkpoint belongs to: one row per family, looked up by exact name.

The checkpointers reach a family only through this table: HF's ``config.json`` names its
``model_type`` (``"llama"``), our checkpointer configs name a legacy one (``"LLAMA2"``).
Adding a family is a new folder under ``torchtune/models/`` plus one row in ``FAMILIES``.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from torchtune.models import gemma2 as _gemma2
from torchtune.models import gemma3 as _gemma3
from torchtune.models import llama2 as _llama2
from torchtune.models import mistral as _mistral
from torchtune.models import phi3 as _phi3
from torchtune.models import qwen2 as _qwen2
from torchtune.models import qwen3 as _qwen3
from torchtune.modules import TransformerDecoder

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class MultimodalFormat:
    """How a family's decoder sits in a multimodal HF checkpoint (Gemma 3 4B and up): the
    checkpointer reads the decoder and writes the other tensors (vision tower, projector)
    back untouched. The family's config functions read such a ``config.json`` themselves.

    Attributes:
        model_types: ``model_type`` values of such ``config.json`` files (``("gemma3",)``).
        split: HF state dict -> ``(decoder tensors in the family's text-only HF keys, the
            other tensors as they are, the key layout found or None for an empty dict)``.
        join: ``(decoder tensors in text-only HF keys, the other tensors, layout)`` -> HF
            state dict; inverse of ``split``.
        tune_to_peft_adapter: native LoRA keys -> PEFT keys on the multimodal model.
        tune_to_peft_adapter_config: as :attr:`ModelFamily.tune_to_peft_adapter_config`, with
            ``target_modules`` limited to the decoder's modules.
    """

    model_types: Tuple[str, ...]
    split: Callable[[StateDict], Tuple[StateDict, StateDict, Optional[str]]]
    join: Callable[[StateDict, StateDict, str], StateDict]
    tune_to_peft_adapter: Callable[[StateDict], StateDict]
    tune_to_peft_adapter_config: Callable[[Dict[str, Any], Optional[str]], Dict[str, Any]]


@dataclass(frozen=True)
class ModelFamily:
    """A family's builders and its pure converter functions (see its ``_convert_weights``).

    Attributes:
        name: the family's folder name (``"llama2"``).
        model_types: legacy checkpointer ``model_type`` values, upper case (``("LLAMA2",)``).
        hf_model_types: ``model_type`` values of HF ``config.json`` files (``("llama",)``).
        builder: ``builder(**hf_config_to_builder_kwargs(config)) -> TransformerDecoder``.
        lora_builder: ``lora_builder(lora_attn_modules, apply_lora_to_mlp=False,
            apply_lora_to_output=False, *, <builder kwargs>, lora_rank, lora_alpha,
            lora_dropout=0.0) -> TransformerDecoder``, the builder with LoRA adapters.
        hf_config_to_builder_kwargs: ``config.json`` dict -> builder kwargs.
        expected_shapes: ``config.json``-style dict -> ``{native key: shape}``.
        meta_params_to_hf_config: ``params.json`` dict -> ``config.json``-style dict, or None
            when the family has no Meta format.
        hf_to_tune: HF state dict -> native.
        tune_to_hf: native state dict -> HF.
        meta_to_tune: ``(state_dict, num_heads, num_kv_heads)`` Meta -> native, or None.
        tune_to_meta: ``(state_dict, num_heads, num_kv_heads)`` native -> Meta, or None.
        peft_to_tune_adapter: PEFT adapter state dict -> native LoRA keys.
        tune_to_peft_adapter: native LoRA keys -> PEFT adapter state dict.
        tune_to_peft_adapter_config: ``(adapter_config, base_model_name_or_path)`` -> PEFT's
            ``adapter_config.json`` dict.
        tied_by_default: whether a ``config.json`` without ``tie_word_embeddings`` is tied
            (the family's HF config class default; the hub's Gemma files leave the key out).
        multimodal: the multimodal checkpoints that hold this family's decoder, or None.
    """

    name: str
    model_types: Tuple[str, ...]
    hf_model_types: Tuple[str, ...]
    builder: Callable[..., TransformerDecoder]
    lora_builder: Callable[..., TransformerDecoder]
    hf_config_to_builder_kwargs: Callable[[Dict[str, Any]], Dict[str, Any]]
    expected_shapes: Callable[[Dict[str, Any]], Dict[str, Tuple[int, ...]]]
    meta_params_to_hf_config: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]]
    hf_to_tune: Callable[[StateDict], StateDict]
    tune_to_hf: Callable[[StateDict], StateDict]
    meta_to_tune: Optional[Callable[[StateDict, int, int], StateDict]]
    tune_to_meta: Optional[Callable[[StateDict, int, int], StateDict]]
    peft_to_tune_adapter: Callable[[StateDict], StateDict]
    tune_to_peft_adapter: Callable[[StateDict], StateDict]
    tune_to_peft_adapter_config: Callable[[Dict[str, Any], Optional[str]], Dict[str, Any]]
    tied_by_default: bool = False
    multimodal: Optional[MultimodalFormat] = None


FAMILIES: Tuple[ModelFamily, ...] = (
    ModelFamily(
        name="llama2",
        model_types=("LLAMA2",),
        hf_model_types=("llama",),
        builder=_llama2.llama2,
        lora_builder=_llama2.lora_llama2,
        hf_config_to_builder_kwargs=_llama2.hf_config_to_builder_kwargs,
        expected_shapes=_llama2.expected_shapes,
        meta_params_to_hf_config=_llama2.meta_params_to_hf_config,
        hf_to_tune=_llama2.hf_to_tune,
        tune_to_hf=_llama2.tune_to_hf,
        meta_to_tune=_llama2.meta_to_tune,
        tune_to_meta=_llama2.tune_to_meta,
        peft_to_tune_adapter=_llama2.peft_to_tune_adapter_weights,
        tune_to_peft_adapter=_llama2.tune_to_peft_adapter_weights,
        tune_to_peft_adapter_config=_llama2.tune_to_peft_adapter_config,
    ),
    ModelFamily(
        name="qwen2",
        model_types=("QWEN2",),
        hf_model_types=("qwen2",),
        builder=_qwen2.qwen2,
        lora_builder=_qwen2.lora_qwen2,
        hf_config_to_builder_kwargs=_qwen2.hf_config_to_builder_kwargs,
        expected_shapes=_qwen2.expected_shapes,
        meta_params_to_hf_config=None,
        hf_to_tune=_qwen2.hf_to_tune,
        tune_to_hf=_qwen2.tune_to_hf,
        meta_to_tune=None,
        tune_to_meta=None,
        peft_to_tune_adapter=_qwen2.peft_to_tune_adapter_weights,
        tune_to_peft_adapter=_qwen2.tune_to_peft_adapter_weights,
        tune_to_peft_adapter_config=_qwen2.tune_to_peft_adapter_config,
    ),
    ModelFamily(
        name="qwen3",
        model_types=("QWEN3",),
        hf_model_types=("qwen3",),
        builder=_qwen3.qwen3,
        lora_builder=_qwen3.lora_qwen3,
        hf_config_to_builder_kwargs=_qwen3.hf_config_to_builder_kwargs,
        expected_shapes=_qwen3.expected_shapes,
        meta_params_to_hf_config=None,
        hf_to_tune=_qwen3.hf_to_tune,
        tune_to_hf=_qwen3.tune_to_hf,
        meta_to_tune=None,
        tune_to_meta=None,
        peft_to_tune_adapter=_qwen3.peft_to_tune_adapter_weights,
        tune_to_peft_adapter=_qwen3.tune_to_peft_adapter_weights,
        tune_to_peft_adapter_config=_qwen3.tune_to_peft_adapter_config,
    ),
    ModelFamily(
        name="mistral",
        model_types=("MISTRAL",),
        hf_model_types=("mistral",),
        builder=_mistral.mistral,
        lora_builder=_mistral.lora_mistral,
        hf_config_to_builder_kwargs=_mistral.hf_config_to_builder_kwargs,
        expected_shapes=_mistral.expected_shapes,
        meta_params_to_hf_config=None,
        hf_to_tune=_mistral.hf_to_tune,
        tune_to_hf=_mistral.tune_to_hf,
        meta_to_tune=None,
        tune_to_meta=None,
        peft_to_tune_adapter=_mistral.peft_to_tune_adapter_weights,
        tune_to_peft_adapter=_mistral.tune_to_peft_adapter_weights,
        tune_to_peft_adapter_config=_mistral.tune_to_peft_adapter_config,
    ),
    ModelFamily(
        name="phi3",
        model_types=("PHI3",),
        hf_model_types=("phi3",),  # Phi-3, Phi-3.5, Phi-4 and Phi-4 mini: Phi3ForCausalLM
        builder=_phi3.phi3,
        lora_builder=_phi3.lora_phi3,
        hf_config_to_builder_kwargs=_phi3.hf_config_to_builder_kwargs,
        expected_shapes=_phi3.expected_shapes,
        meta_params_to_hf_config=None,
        hf_to_tune=_phi3.hf_to_tune,
        tune_to_hf=_phi3.tune_to_hf,
        meta_to_tune=None,
        tune_to_meta=None,
        peft_to_tune_adapter=_phi3.peft_to_tune_adapter_weights,
        tune_to_peft_adapter=_phi3.tune_to_peft_adapter_weights,
        tune_to_peft_adapter_config=_phi3.tune_to_peft_adapter_config,
    ),
    ModelFamily(
        name="gemma2",
        model_types=("GEMMA2",),
        hf_model_types=("gemma2",),
        builder=_gemma2.gemma2,
        lora_builder=_gemma2.lora_gemma2,
        hf_config_to_builder_kwargs=_gemma2.hf_config_to_builder_kwargs,
        expected_shapes=_gemma2.expected_shapes,
        meta_params_to_hf_config=None,
        hf_to_tune=_gemma2.hf_to_tune,
        tune_to_hf=_gemma2.tune_to_hf,
        meta_to_tune=None,
        tune_to_meta=None,
        peft_to_tune_adapter=_gemma2.peft_to_tune_adapter_weights,
        tune_to_peft_adapter=_gemma2.tune_to_peft_adapter_weights,
        tune_to_peft_adapter_config=_gemma2.tune_to_peft_adapter_config,
        tied_by_default=True,
    ),
    ModelFamily(
        name="gemma3",
        model_types=("GEMMA3",),
        hf_model_types=("gemma3_text",),
        builder=_gemma3.gemma3,
        lora_builder=_gemma3.lora_gemma3,
        hf_config_to_builder_kwargs=_gemma3.hf_config_to_builder_kwargs,
        expected_shapes=_gemma3.expected_shapes,
        meta_params_to_hf_config=None,
        hf_to_tune=_gemma3.hf_to_tune,
        tune_to_hf=_gemma3.tune_to_hf,
        meta_to_tune=None,
        tune_to_meta=None,
        peft_to_tune_adapter=_gemma3.peft_to_tune_adapter_weights,
        tune_to_peft_adapter=_gemma3.tune_to_peft_adapter_weights,
        tune_to_peft_adapter_config=_gemma3.tune_to_peft_adapter_config,
        tied_by_default=True,
        # Gemma 3 4B / 12B / 27B: Gemma3ForConditionalGeneration, a vision tower beside it.
        multimodal=MultimodalFormat(
            model_types=(_gemma3.MULTIMODAL_MODEL_TYPE,),
            split=_gemma3.split_multimodal,
            join=_gemma3.join_multimodal,
            tune_to_peft_adapter=_gemma3.multimodal_peft_adapter_weights,
            tune_to_peft_adapter_config=_gemma3.multimodal_peft_adapter_config,
        ),
    ),
)


def _multimodal_types(family: ModelFamily) -> Tuple[str, ...]:
    return family.multimodal.model_types if family.multimodal is not None else ()


def _lookup(name: str, attr: str, what: str, given: str) -> ModelFamily:
    for family in FAMILIES:
        if name in getattr(family, attr):
            return family
    if attr == "hf_model_types":
        for family in FAMILIES:
            if name in _multimodal_types(family):
                return family
    supported: List[str] = [t for f in FAMILIES for t in getattr(f, attr)]
    if attr == "hf_model_types":
        supported += [t for f in FAMILIES for t in _multimodal_types(f)]
    raise ValueError(f"Unknown {what} '{given}'; supported: {supported}")


def family_for_model_type(model_type: str) -> ModelFamily:
    """The family of a checkpointer ``model_type`` (``"LLAMA2"``; case does not matter).

    Raises:
        ValueError: on an unknown ``model_type``, listing the supported ones.
    """
    return _lookup(str(model_type).upper(), "model_types", "model_type", model_type)


def family_for_hf_model_type(model_type: str) -> ModelFamily:
    """The family of an HF ``config.json`` ``model_type`` (``"llama"``, exact); a multimodal
    one (``"gemma3"``) names the family of its language model.

    Raises:
        ValueError: on an unknown ``model_type``, listing the supported ones.
    """
    return _lookup(str(model_type), "hf_model_types", "HF model_type", model_type)
