# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Llama 3.x and SmolLM2 sizes. The architecture is the Llama family's (HF ``model_type:
llama``, :mod:`torchtune.models.llama2`): its builders, converter and table row."""

from torchtune.models.llama3._model_builders import (
    llama3_1_8b,
    llama3_2_1b,
    llama3_2_3b,
    lora_llama3_1_8b,
    lora_llama3_2_1b,
    lora_llama3_2_3b,
    lora_smollm2_1_7b,
    lora_smollm2_135m,
    smollm2_1_7b,
    smollm2_135m,
)

__all__ = [
    "llama3_1_8b",
    "llama3_2_1b",
    "llama3_2_3b",
    "lora_llama3_1_8b",
    "lora_llama3_2_1b",
    "lora_llama3_2_3b",
    "lora_smollm2_135m",
    "lora_smollm2_1_7b",
    "smollm2_135m",
    "smollm2_1_7b",
]
