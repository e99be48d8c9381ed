# Copyright (c) torchtune contributors. BSD-3-Clause license.
from types import SimpleNamespace

import pytest

from tests.test_utils import train_sentencepiece
from torchtune.data import padding_id
from torchtune.modules.tokenizers import SentencePieceTokenizer, Tokenizer


def _tok(pad_id, eos_id=2):
    return SimpleNamespace(pad_id=pad_id, eos_id=eos_id, bos_id=1)


def test_padding_id_is_pad_id_else_eos_id():
    assert padding_id(_tok(pad_id=7)) == 7
    assert padding_id(_tok(pad_id=0)) == 0  # a real id, not "unset"
    assert padding_id(_tok(pad_id=None, eos_id=5)) == 5  # Llama 3: no pad token


@pytest.mark.parametrize(
    "pad_id, eos_id", [(None, None), (None, -1), (-1, 2), (True, 2), (None, "2")]
)
def test_padding_id_rejects_what_is_not_a_token_id(pad_id, eos_id):
    with pytest.raises(ValueError, match=rf"pad_id={pad_id!r} and eos_id={eos_id!r}"):
        padding_id(_tok(pad_id=pad_id, eos_id=eos_id))


def test_sentencepiece_tokenizer_is_a_tokenizer(tmp_path):
    tok = SentencePieceTokenizer(train_sentencepiece(tmp_path / "m"))
    assert isinstance(tok, Tokenizer)
    # Llama 2's model defines no pad piece: the wrapper already reports 0 (<unk>), kept as is.
    assert tok.pad_id == 0 and padding_id(tok) == 0
    assert not isinstance(SimpleNamespace(encode=None, decode=None), Tokenizer)
