# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.data._collate import padded_collate
from torchtune.data._common import CROSS_ENTROPY_IGNORE_IDX, padding_id
from torchtune.data._instruct_chat_template import instruct_chat_template
from torchtune.data._pair_collate import padded_collate_pairs
from torchtune.data._templates import AlpacaInstructTemplate, InstructTemplate

__all__ = [
    "instruct_chat_template",
    "AlpacaInstructTemplate",
    "CROSS_ENTROPY_IGNORE_IDX",
    "InstructTemplate",
    "padded_collate",
    "padded_collate_pairs",
    "padding_id",
]
