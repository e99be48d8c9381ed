# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.phi3._component_builders import lora_phi3, phi3
from torchtune.models.phi3._convert_weights import (
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    lora_targets_to_hf,
    peft_to_tune_adapter_weights,
    tune_to_hf,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.phi3._model_builders import (
    lora_phi3_5_mini,
    lora_phi3_mini_4k,
    lora_phi4,
    lora_phi4_mini,
    phi3_5_mini,
    phi3_mini_4k,
    phi4,
    phi4_mini,
)

__all__ = [
    "expected_shapes",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "lora_phi3",
    "lora_phi3_5_mini",
    "lora_phi3_mini_4k",
    "lora_phi4",
    "lora_phi4_mini",
    "lora_targets_to_hf",
    "peft_to_tune_adapter_weights",
    "phi3",
    "phi3_5_mini",
    "phi3_mini_4k",
    "phi4",
    "phi4_mini",
    "tune_to_hf",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
