# Copyright (c) torchtune contributors. BSD-3-Clause license.
import json

import pytest
import sentencepiece as spm

from tests.test_utils import sample_corpus
from torchtune.datasets import PackedDataset, TextCompletionDataset, text_completion_dataset
from torchtune.datasets._packed import pack_plan
from torchtune.modules.tokenizers import SentencePieceTokenizer


@pytest.fixture
def text_file(tmp_path):
    lines = sample_corpus(n_lines=6, seed=3)
    lines[2] = "  two lines\nwith  spaces and 東京\n"
    path = tmp_path / "text.jsonl"
    path.write_text(
        "".join(json.dumps({"body": line, "id": i}) + "\n" for i, line in enumerate(lines))
    )
    return path, lines


@pytest.fixture(params=["sentencepiece", "byte_bpe"])
def tokenizers(request):
    """(the tokenizer under test, its reference encode(text, add_bos, add_eos))."""
    if request.param == "byte_bpe":
        return request.getfixturevalue("byte_bpe"), request.getfixturevalue("byte_bpe_reference")
    path = request.getfixturevalue("sp_model_path")
    sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode(text, add_bos=True, add_eos=True):
        return sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    return SentencePieceTokenizer(path), encode


def test_tokens_match_the_reference_tokenizer(tokenizers, text_file, hf_cache):
    path, lines = text_file
    tok, reference = tokenizers
    ds = text_completion_dataset(
        tok, "json", column="body", max_seq_len=None, data_files=str(path), cache_dir=hf_cache
    )
    assert isinstance(ds, TextCompletionDataset) and len(ds) == len(lines)
    for line, s in zip(lines, ds):
        assert s["tokens"] == reference(line, add_bos=True, add_eos=True)
        assert s["labels"] == s["tokens"]
        assert tok.decode(s["tokens"]) == line


def test_packing_without_a_pad_id_pads_with_eos(byte_bpe, text_file, hf_cache):
    path, _ = text_file
    assert byte_bpe.pad_id is None
    kwargs = dict(column="body", data_files=str(path), cache_dir=hf_cache)
    full = text_completion_dataset(byte_bpe, "json", max_seq_len=None, **kwargs)
    packed = text_completion_dataset(byte_bpe, "json", max_seq_len=64, packed=True, **kwargs)
    lens = [len(full[i]["tokens"]) for i in range(len(full))]
    plan = pack_plan(lens, 64)
    assert len(packed) == len(plan)
    n_padded = 0
    for row, samples in zip(packed, plan):
        flat = [t for i in samples for t in full[i]["tokens"][:64]]
        pad = 64 - len(flat)
        assert row["tokens"] == flat + [byte_bpe.eos_id] * pad
        assert row["labels"][len(flat) :] == [-100] * pad
        n_padded += pad
    assert n_padded > 0


def test_truncation_and_packing(sp_model_path, text_file, hf_cache):
    path, lines = text_file
    tok = SentencePieceTokenizer(sp_model_path)
    full = text_completion_dataset(
        tok, "json", column="body", max_seq_len=None, data_files=str(path), cache_dir=hf_cache
    )
    cut = text_completion_dataset(
        tok, "json", column="body", max_seq_len=8, data_files=str(path), cache_dir=hf_cache
    )
    for i in range(len(full)):
        assert cut[i]["tokens"] == full[i]["tokens"][:8]
    packed = text_completion_dataset(
        tok,
        "json",
        column="body",
        max_seq_len=64,
        packed=True,
        data_files=str(path),
        cache_dir=hf_cache,
    )
    assert isinstance(packed, PackedDataset)
    kept = [t for row in packed for t in row["tokens"]]
    # Every sample appears once (truncated to 64), in the rows pack_plan lays out, separated
    # only by padding.
    lens = [len(full[i]["tokens"]) for i in range(len(full))]
    order = [i for row in pack_plan(lens, 64) for i in row]
    assert sorted(order) == list(range(len(full)))
    flat = [t for i in order for t in full[i]["tokens"][:64]]
    assert [t for t in kept if t != tok.pad_id] == [t for t in flat if t != tok.pad_id]
    assert all(len(row["tokens"]) == 64 for row in packed)


def test_bad_text_rows(sp_model_path, tmp_path, hf_cache, caplog):
    tok = SentencePieceTokenizer(sp_model_path)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ""}\n{"other": "x"}\n')
    with pytest.raises(ValueError, match=r"row 1, column 'text' is empty"):
        text_completion_dataset(tok, "json", data_files=str(path), cache_dir=hf_cache)
    with pytest.raises(ValueError, match=r"\['body'\] missing from every row"):
        text_completion_dataset(
            tok, "json", column="body", data_files=str(path), cache_dir=hf_cache
        )
    ds = text_completion_dataset(
        tok, "json", data_files=str(path), skip_bad_rows=True, cache_dir=hf_cache
    )
    assert len(ds) == 1 and ds.num_skipped == 2 and "skipped 2 of 3 rows" in caplog.text
    with pytest.raises(ValueError, match="packed=True needs a max_seq_len"):
        text_completion_dataset(
            tok,
            "json",
            max_seq_len=None,
            packed=True,
            data_files=str(path),
            skip_bad_rows=True,
            cache_dir=hf_cache,
        )
