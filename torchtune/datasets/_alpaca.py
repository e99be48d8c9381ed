# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The Stanford Alpaca instruction dataset."""

from typing import Any, Optional, Union

from torchtune.data import AlpacaInstructTemplate
from torchtune.datasets._instruct import InstructDataset, instruct_dataset
from torchtune.datasets._packed import PackedDataset
from torchtune.modules.tokenizers import Tokenizer


def alpaca_dataset(
    tokenizer: Tokenizer,
    source: str = "tatsu-lab/alpaca",
    train_on_input: bool = True,
    max_seq_len: Optional[int] = 512,
    packed: bool = False,
    split: str = "train",
    skip_bad_rows: bool = False,
    **load_dataset_kwargs: Any,
) -> Union[InstructDataset, PackedDataset]:
    """Alpaca-format data (``instruction``, ``input``, ``output``) with the Stanford Alpaca prompt.

    ``source`` may be the Hub id (default) or a local file, e.g.
    ``alpaca_dataset(tok, source="json", data_files="alpaca_data.json")``.

    Args:
        tokenizer (Tokenizer): any torchtune tokenizer (SentencePiece or tokenizer.json).
        source (str): Hub id or ``datasets`` builder name. Default "tatsu-lab/alpaca".
        train_on_input (bool): compute the loss on the prompt too. Default True, as in the
            original Alpaca recipe.
        max_seq_len (Optional[int]): truncate (or, packed, pack) to this many tokens. Default 512.
        packed (bool): pack samples into ``max_seq_len`` rows. Default False.
        split (str): dataset split. Default "train".
        skip_bad_rows (bool): drop invalid rows (their count is logged) instead of raising.
        **load_dataset_kwargs: passed to ``datasets.load_dataset``.

    Returns:
        Union[InstructDataset, PackedDataset]: the dataset.
    """
    return instruct_dataset(
        tokenizer,
        source,
        template=AlpacaInstructTemplate,
        train_on_input=train_on_input,
        max_seq_len=max_seq_len,
        packed=packed,
        split=split,
        skip_bad_rows=skip_bad_rows,
        **load_dataset_kwargs,
    )
