# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models._hf_config import from_hf_config
from torchtune.models._hf_tokenizer import hf_tokenizer

__all__ = ["from_hf_config", "hf_tokenizer"]
