# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.gemma3._component_builders import gemma3, lora_gemma3
from torchtune.models.gemma3._convert_weights import (
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    lora_targets_to_hf,
    peft_to_tune_adapter_weights,
    tune_to_hf,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.gemma3._model_builders import (
    gemma3_1b,
    gemma3_4b,
    lora_gemma3_1b,
    lora_gemma3_4b,
)

__all__ = [
    "expected_shapes",
    "gemma3",
    "gemma3_1b",
    "gemma3_4b",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "lora_gemma3",
    "lora_gemma3_1b",
    "lora_gemma3_4b",
    "lora_targets_to_hf",
    "peft_to_tune_adapter_weights",
    "tune_to_hf",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
