# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.gemma2._component_builders import alternating_windows, gemma2, lora_gemma2
from torchtune.models.gemma2._convert_weights import (
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    lora_targets_to_hf,
    peft_to_tune_adapter_weights,
    tune_to_hf,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.gemma2._model_builders import (
    gemma2_2b,
    gemma2_9b,
    lora_gemma2_2b,
    lora_gemma2_9b,
)

__all__ = [
    "alternating_windows",
    "expected_shapes",
    "gemma2",
    "gemma2_2b",
    "gemma2_9b",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "lora_gemma2",
    "lora_gemma2_2b",
    "lora_gemma2_9b",
    "lora_targets_to_hf",
    "peft_to_tune_adapter_weights",
    "tune_to_hf",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
