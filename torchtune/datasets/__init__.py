# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.datasets._alpaca import alpaca_dataset
from torchtune.datasets._chat import ChatDataset, chat_dataset
from torchtune.datasets._instruct import InstructDataset, instruct_dataset
from torchtune.datasets._packed import PackedDataset
from torchtune.datasets._preference import PreferenceDataset, preference_dataset
from torchtune.datasets._text_completion import TextCompletionDataset, text_completion_dataset

__all__ = [
    "alpaca_dataset",
    "chat_dataset",
    "ChatDataset",
    "instruct_dataset",
    "InstructDataset",
    "PackedDataset",
    "preference_dataset",
    "PreferenceDataset",
    "text_completion_dataset",
    "TextCompletionDataset",
]
