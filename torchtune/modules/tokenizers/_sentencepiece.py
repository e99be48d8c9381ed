# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""A thin, typed wrapper around a SentencePiece model file."""

from pathlib import Path
from typing import Iterable, List, Union

from sentencepiece import SentencePieceProcessor


class SentencePieceTokenizer:
    """Encode and decode text with a SentencePiece ``.model`` file (e.g. Llama2's ``tokenizer.model``).

    Encoding is plain SentencePiece: with the model's ``add_dummy_prefix`` every encoded piece of
    text starts with a word-boundary marker, so ``encode(a) + encode(b)`` is *not* ``encode(a + b)``
    in general (as with Hugging Face's ``legacy=True`` Llama tokenizer). That is why the instruct
    datasets encode prompt + response as one text and find the prompt's tokens in it (see
    ``InstructDataset``) instead of encoding the response on its own.

    Args:
        path (Union[str, Path]): path of the SentencePiece model file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a SentencePiece model.
    """

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {path}")
        self._spm = SentencePieceProcessor()
        try:
            self._spm.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a valid SentencePiece model file: {e}") from e
        self.path = path
        self.vocab_size: int = self._spm.GetPieceSize()
        self.bos_id: int = self._spm.bos_id()
        self.eos_id: int = self._spm.eos_id()
        # Llama2's model defines no pad piece (pad_id() == -1); 0 (<unk>) is a safe filler because
        # padded positions are always masked out of the loss.
        pad_id = self._spm.pad_id()
        self.pad_id: int = pad_id if pad_id >= 0 else 0

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Encode ``text`` into token ids.

        Args:
            text (str): the text to encode; may be empty.
            add_bos (bool): prepend ``bos_id``. Default True.
            add_eos (bool): append ``eos_id``. Default True.

        Returns:
            List[int]: the token ids.

        Raises:
            TypeError: if ``text`` is not a string.
            ValueError: if a BOS/EOS is requested but the model defines none.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}: {text!r}")
        if add_bos and self.bos_id < 0:
            raise ValueError(f"add_bos=True but the model {self.path} defines no BOS piece")
        if add_eos and self.eos_id < 0:
            raise ValueError(f"add_eos=True but the model {self.path} defines no EOS piece")
        return self._spm.Encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids (a list, or a 1-D tensor) back to text.

        Control pieces (BOS/EOS/pad) decode to nothing; byte-fallback pieces are fused into
        their UTF-8 characters.

        Args:
            ids (Iterable[int]): token ids, each in ``[0, vocab_size)``.

        Returns:
            str: the decoded text.

        Raises:
            ValueError: if an id is out of range (e.g. the -100 ignore index).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        return self._spm.Decode(ids)
