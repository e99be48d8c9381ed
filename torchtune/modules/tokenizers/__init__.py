# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.modules.tokenizers._protocol import Tokenizer
from torchtune.modules.tokenizers._sentencepiece import SentencePieceTokenizer

__all__ = ["SentencePieceTokenizer", "Tokenizer"]
