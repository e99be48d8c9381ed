# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The model_type table: exact lookups, errors that list what is supported."""

import dataclasses

import pytest

from torchtune.models import gemma2, gemma3, llama2, mistral, phi3, qwen2, qwen3
from torchtune.models._families import (
    FAMILIES,
    ModelFamily,
    MultimodalFormat,
    family_for_hf_model_type,
    family_for_model_type,
)


def test_llama_names_map_to_the_llama2_row():
    row = family_for_model_type("LLAMA2")
    assert row.name == "llama2" and family_for_model_type("llama2") is row  # any case
    assert family_for_hf_model_type("llama") is row
    assert row.builder is llama2.llama2 and row.lora_builder is llama2.lora_llama2
    assert row.hf_to_tune is llama2.hf_to_tune and row.tune_to_meta is llama2.tune_to_meta
    assert row.peft_to_tune_adapter is llama2.peft_to_tune_adapter_weights


# HF's model_type where it is not the folder's name.
_HF_NAME = {"gemma3": "gemma3_text"}


@pytest.mark.parametrize(
    "module", [qwen2, qwen3, mistral, phi3, gemma2, gemma3], ids=lambda m: m.__name__
)
def test_new_family_rows_point_at_their_modules(module):
    name = module.__name__.rsplit(".", 1)[-1]
    row = family_for_hf_model_type(_HF_NAME.get(name, name))
    assert row.name == name and family_for_model_type(name.upper()) is row
    assert row.builder is getattr(module, name)
    assert row.lora_builder is getattr(module, f"lora_{name}")
    assert row.hf_to_tune is module.hf_to_tune and row.tune_to_hf is module.tune_to_hf
    assert row.meta_to_tune is None and row.meta_params_to_hf_config is None
    assert row.tune_to_peft_adapter is module.tune_to_peft_adapter_weights


def test_unknown_model_types_raise_listing_the_supported_ones():
    with pytest.raises(
        ValueError,
        match=r"Unknown model_type 'gpt9'; supported: \['LLAMA2', 'QWEN2', 'QWEN3', 'MISTRAL', "
        r"'PHI3', 'GEMMA2', 'GEMMA3'\]",
    ):
        family_for_model_type("gpt9")
    with pytest.raises(
        ValueError,
        match=r"Unknown HF model_type 'gemma3_vision'; supported: \['llama', 'qwen2', 'qwen3', "
        r"'mistral', 'phi3', 'gemma2', 'gemma3_text', 'gemma3'\]",
    ):
        family_for_hf_model_type("gemma3_vision")
    # The multimodal Gemma 3 names the family of its language model.
    assert family_for_hf_model_type("gemma3").name == "gemma3"
    # HF names are exact: no fuzzy or case-folded match.
    with pytest.raises(ValueError, match="Unknown HF model_type 'Llama'"):
        family_for_hf_model_type("Llama")
    with pytest.raises(ValueError, match="Unknown model_type 'llama'"):
        family_for_model_type("llama")


def test_rows_are_frozen_complete_and_unambiguous():
    fields = [f.name for f in dataclasses.fields(ModelFamily)]
    for row in FAMILIES:
        with pytest.raises(dataclasses.FrozenInstanceError):
            row.name = "x"
        for name in fields:
            value = getattr(row, name)
            if name == "tied_by_default":
                assert isinstance(value, bool), row.name
            elif name == "multimodal":
                assert value is None or isinstance(value, MultimodalFormat), row.name
            elif name not in ("name", "model_types", "hf_model_types"):
                assert value is None or callable(value), (row.name, name)
        assert all(t == t.upper() for t in row.model_types)
    for attr in ("name", "model_types", "hf_model_types"):
        names = [
            n
            for row in FAMILIES
            for n in ([getattr(row, attr)] if attr == "name" else getattr(row, attr))
        ]
        assert len(names) == len(set(names)), attr
    # A multimodal model_type names one family and is no family's text model_type.
    multimodal = [t for row in FAMILIES if row.multimodal for t in row.multimodal.model_types]
    text = [t for row in FAMILIES for t in row.hf_model_types]
    assert len(multimodal) == len(set(multimodal)) and not set(multimodal) & set(text)
