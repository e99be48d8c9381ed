# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Raw text for continued pre-training."""

from typing import Any, Dict, List, Optional, Union

from torch.utils.data import Dataset

from torchtune.data import padding_id
from torchtune.datasets._packed import PackedDataset
from torchtune.datasets._utils import load_source, validate_columns
from torchtune.modules.tokenizers import Tokenizer


class TextCompletionDataset(Dataset):
    """One sample per row of a text column: ``tokens = encode(text)`` (BOS and EOS), labels = tokens.

    Args:
        tokenizer (Tokenizer): any torchtune tokenizer (SentencePiece or tokenizer.json).
        source (str): Hub id or ``datasets`` builder name (``"json"``, ``"text"``, ...).
        column (str): the column holding the text. Default "text".
        max_seq_len (Optional[int]): truncate to this many tokens (a cut sample loses its EOS).
        split (str): dataset split. Default "train".
        skip_bad_rows (bool): drop rows whose text is missing, not a string or empty.
        **load_dataset_kwargs: passed to ``datasets.load_dataset``.

    Raises:
        ValueError: on a bad ``max_seq_len`` or bad rows.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        source: str,
        column: str = "text",
        max_seq_len: Optional[int] = None,
        split: str = "train",
        skip_bad_rows: bool = False,
        **load_dataset_kwargs: Any,
    ):
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len}")
        self._tokenizer = tokenizer
        self._column = column
        self.max_seq_len = max_seq_len
        self._data, label = load_source(source, split, **load_dataset_kwargs)
        self._indices = validate_columns(self._data, {column: True}, label, skip_bad_rows)
        self.num_skipped = 0 if self._indices is None else len(self._data) - len(self._indices)

    def __len__(self) -> int:
        return len(self._data) if self._indices is None else len(self._indices)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        row = self._data[int(index if self._indices is None else self._indices[index])]
        tokens = self._tokenizer.encode(row[self._column], add_bos=True, add_eos=True)
        if self.max_seq_len is not None:
            tokens = tokens[: self.max_seq_len]
        return {"tokens": tokens, "labels": list(tokens)}


def text_completion_dataset(
    tokenizer: Tokenizer,
    source: str,
    column: str = "text",
    max_seq_len: Optional[int] = 512,
    packed: bool = False,
    split: str = "train",
    skip_bad_rows: bool = False,
    **load_dataset_kwargs: Any,
) -> Union[TextCompletionDataset, PackedDataset]:
    """Build a text-completion dataset, optionally packed into ``max_seq_len`` rows.

    Args: see ``TextCompletionDataset``; ``packed`` as in ``PackedDataset``.

    Returns:
        Union[TextCompletionDataset, PackedDataset]: the dataset.
    """
    ds = TextCompletionDataset(
        tokenizer,
        source,
        column=column,
        max_seq_len=max_seq_len,
        split=split,
        skip_bad_rows=skip_bad_rows,
        **load_dataset_kwargs,
    )
    if packed:
        if max_seq_len is None:
            raise ValueError("packed=True needs a max_seq_len")
        return PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=padding_id(tokenizer))
    return ds
