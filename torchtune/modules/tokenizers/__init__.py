# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.modules.tokenizers._hf import HFTokenizer
from torchtune.modules.tokenizers._protocol import Tokenizer
from torchtune.modules.tokenizers._sentencepiece import SentencePieceTokenizer
from torchtune.modules.tokenizers._utils import truncate_chat

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "truncate_chat"]
