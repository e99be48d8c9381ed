# Copyright (c) torchtune contributors. BSD-3-Clause license.
from pathlib import Path
from typing import Optional, Union

from torchtune.modules.tokenizers import HFTokenizer


def hf_tokenizer(path: Union[str, Path], max_seq_len: Optional[int] = None) -> HFTokenizer:
    """The tokenizer and chat template of a Hugging Face model folder (``tokenizer.json`` and
    ``tokenizer_config.json``; see :class:`~torchtune.modules.tokenizers.HFTokenizer`).

    Args:
        path (Union[str, Path]): the model folder.
        max_seq_len (Optional[int]): truncate ``tokenize_messages`` output to this many tokens.

    Returns:
        HFTokenizer: the tokenizer.
    """
    return HFTokenizer(path, max_seq_len=max_seq_len)
