# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.llama2._component_builders import llama2, lora_llama2
from torchtune.models.llama2._convert_weights import (
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    lora_targets_to_hf,
    meta_params_to_hf_config,
    meta_to_tune,
    peft_to_tune_adapter_weights,
    tune_to_hf,
    tune_to_meta,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.llama2._model_builders import (
    llama2_7b,
    llama2_13b,
    llama2_70b,
    lora_llama2_7b,
    lora_llama2_13b,
)
from torchtune.models.llama2._tokenizer import llama2_tokenizer

__all__ = [
    "expected_shapes",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "llama2",
    "llama2_7b",
    "llama2_13b",
    "llama2_70b",
    "llama2_tokenizer",
    "lora_llama2",
    "lora_llama2_7b",
    "lora_llama2_13b",
    "lora_targets_to_hf",
    "meta_params_to_hf_config",
    "meta_to_tune",
    "peft_to_tune_adapter_weights",
    "tune_to_hf",
    "tune_to_meta",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
