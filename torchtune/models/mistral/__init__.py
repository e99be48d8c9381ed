# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.mistral._component_builders import lora_mistral, mistral
from torchtune.models.mistral._convert_weights import (
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    lora_targets_to_hf,
    peft_to_tune_adapter_weights,
    tune_to_hf,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.mistral._model_builders import (
    lora_mistral_7b,
    mistral_7b,
)

__all__ = [
    "expected_shapes",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "lora_mistral",
    "lora_mistral_7b",
    "lora_targets_to_hf",
    "mistral",
    "mistral_7b",
    "peft_to_tune_adapter_weights",
    "tune_to_hf",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
