# Copyright (c) torchtune contributors. BSD-3-Clause license.
from pathlib import Path
from typing import Union

from torchtune.modules.tokenizers import SentencePieceTokenizer


def llama2_tokenizer(path: Union[str, Path]) -> SentencePieceTokenizer:
    """Llama2's tokenizer: the SentencePiece ``tokenizer.model`` shipped with the weights.

    Args:
        path (Union[str, Path]): path of ``tokenizer.model``.

    Returns:
        SentencePieceTokenizer: BOS 1, EOS 2, no pad piece (so ``pad_id`` is 0), vocab 32000.
    """
    return SentencePieceTokenizer(path)
