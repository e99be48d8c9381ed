# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""What the datasets, recipes and generation need from a tokenizer."""

from typing import List, Optional, Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """The duck-typed surface every torchtune tokenizer offers.

    ``SentencePieceTokenizer`` (a ``.model`` file, Llama 2) and the ``tokenizer.json`` one
    (``torchtune.models.hf_tokenizer``) both satisfy it; code that takes a tokenizer should
    need nothing else. The ids are read-only properties here so that an implementation may
    declare them as plain ``int`` attributes.

    ``pad_id`` is None where the model defines no padding token (Llama 3, Qwen); take the id
    to pad with from :func:`torchtune.data.padding_id`, never from ``pad_id`` directly.
    """

    @property
    def bos_id(self) -> Optional[int]:
        """Beginning-of-sequence id (None where the model has none)."""
        ...

    @property
    def eos_id(self) -> int:
        """End-of-sequence id: where generation stops and a sample ends."""
        ...

    @property
    def pad_id(self) -> Optional[int]:
        """Padding id, or None where the model defines none."""
        ...

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Token ids of ``text``, with BOS prepended and EOS appended as asked."""
        ...

    def decode(self, ids: List[int]) -> str:
        """The text of ``ids``, special tokens dropped."""
        ...
