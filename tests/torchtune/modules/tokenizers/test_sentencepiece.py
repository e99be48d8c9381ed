# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""SentencePieceTokenizer against sentencepiece itself and transformers' sentencepiece-backed tokenizer.

Reference: transformers 5 dropped the slow ``LlamaTokenizer`` class (``transformers.LlamaTokenizer`` is
now the `tokenizers`-backed one, and converting a ``.model`` to it needs protobuf, absent here). The
sentencepiece-backed path is ``transformers.SentencePieceBackend(vocab_file=..., legacy=True)``: with
``legacy=True`` it encodes through ``SentencePieceProcessor.encode`` like the old slow Llama tokenizer.
Its generic ``decode`` joins pieces and strips the ends, and leaves byte-fallback pieces unfused, so
decoding is compared with it only where that generic join is defined (see the decode test).
"""

import pytest
import sentencepiece as spm
import torch

from tests.test_utils import train_sentencepiece
from torchtune.models.llama2 import llama2_tokenizer
from torchtune.modules.tokenizers import SentencePieceTokenizer

CORPUS = [
    "",
    " ",
    "\n",
    "hello world",
    "  leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "line one\nline two\n\nline four\n",
    "café naïve 東京 ünïcödé",
    "tabs\tand 🙂 emoji, 中文字符",
    "Hello World. What is the SUM of 12 and 30?",
    "### Instruction:\nAdd the two numbers.\n\n### Response:\n42",
]


@pytest.fixture(scope="module", params=["nmt_nfkc", "identity"])
def model_path(request, tmp_path_factory):
    return train_sentencepiece(
        tmp_path_factory.mktemp("sp") / "m", normalization_rule_name=request.param
    )


@pytest.fixture(scope="module")
def identity_model_path(tmp_path_factory):
    return train_sentencepiece(
        tmp_path_factory.mktemp("sp_id") / "m", normalization_rule_name="identity"
    )


def _hf_tokenizer(path):
    from transformers import SentencePieceBackend

    return SentencePieceBackend(
        vocab_file=str(path), legacy=True, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_special_ids_and_vocab(model_path):
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tok = SentencePieceTokenizer(model_path)
    assert tok.vocab_size == sp.get_piece_size() == 400
    assert (tok.bos_id, tok.eos_id) == (sp.piece_to_id("<s>"), sp.piece_to_id("</s>")) == (1, 2)
    assert sp.pad_id() == -1 and tok.pad_id == 0  # no pad piece -> 0


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("add_eos", [True, False])
def test_encode_matches_sentencepiece_and_hf(model_path, add_bos, add_eos):
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    hf = _hf_tokenizer(model_path)
    tok = SentencePieceTokenizer(model_path)
    for text in CORPUS:
        body = sp.encode(text)
        expected = [hf.bos_token_id] * add_bos + body + [hf.eos_token_id] * add_eos
        assert tok.encode(text, add_bos=add_bos, add_eos=add_eos) == expected, repr(text)
        assert hf.encode(text, add_special_tokens=False) == body, repr(text)


def test_decode_matches_sentencepiece_and_hf(model_path):
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    hf = _hf_tokenizer(model_path)
    tok = SentencePieceTokenizer(model_path)
    compared_with_hf = 0
    for text in CORPUS:
        ids = tok.encode(text)
        ours = tok.decode(ids)
        assert ours == sp.decode(ids), repr(text)
        assert tok.decode(torch.tensor(ids)) == ours
        # HF's generic decode strips the ends and cannot fuse byte-fallback pieces.
        if not any(sp.is_byte(i) for i in ids):
            assert hf.decode(ids, skip_special_tokens=True) == ours.strip(), repr(text)
            compared_with_hf += 1
    assert compared_with_hf >= 6


def test_identity_model_round_trips_exactly(identity_model_path):
    # Llama2's tokenizer.model uses the identity normalizer: spaces, newlines, tabs and unseen
    # characters (via byte fallback) all survive encode -> decode.
    tok = SentencePieceTokenizer(identity_model_path)
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    assert tok.encode("", add_bos=False, add_eos=False) == []


def test_dummy_prefix_is_kept_per_piece(identity_model_path):
    # Encoding two pieces separately keeps the second piece's word-boundary marker: the reason
    # the instruct datasets encode prompt + response as one text.
    sp = spm.SentencePieceProcessor(model_file=str(identity_model_path))
    tok = SentencePieceTokenizer(identity_model_path)
    second = tok.encode("world", add_bos=False, add_eos=False)
    assert sp.id_to_piece(second[0]).startswith("\u2581")
    assert tok.decode(tok.encode("hello", add_eos=False) + second) == "hello world"


def test_literal_special_strings_are_text(model_path):
    # Unlike HF (which splits "<s>" out as a special token), text never injects control ids.
    tok = SentencePieceTokenizer(model_path)
    ids = tok.encode("<s> x </s>", add_bos=False, add_eos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_errors(tmp_path, model_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceTokenizer(bad)
    tok = SentencePieceTokenizer(model_path)
    with pytest.raises(TypeError, match="str"):
        tok.encode(None)
    with pytest.raises(ValueError, match="-100"):
        tok.decode([5, -100])


def test_llama2_tokenizer_builder(model_path):
    tok = llama2_tokenizer(model_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("hello world") == SentencePieceTokenizer(model_path).encode("hello world")
