# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.gemma3._component_builders import gemma3, lora_gemma3
from torchtune.models.gemma3._convert_weights import (
    MULTIMODAL_MODEL_TYPE,
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    join_multimodal,
    lora_targets_to_hf,
    multimodal_peft_adapter_config,
    multimodal_peft_adapter_weights,
    peft_to_tune_adapter_weights,
    split_multimodal,
    text_config,
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
    "MULTIMODAL_MODEL_TYPE",
    "expected_shapes",
    "gemma3",
    "gemma3_1b",
    "gemma3_4b",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "join_multimodal",
    "lora_gemma3",
    "lora_gemma3_1b",
    "lora_gemma3_4b",
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
