# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Alpaca / instruct datasets, token by token against sentencepiece and a byte-level BPE."""

import json
import logging
from pathlib import Path

import datasets
import pytest
import sentencepiece as spm

import torchtune
from tests.test_utils import write_alpaca_json
from torchtune.data import AlpacaInstructTemplate, InstructTemplate, padding_id
from torchtune.datasets import InstructDataset, PackedDataset, alpaca_dataset, instruct_dataset
from torchtune.datasets._packed import pack_plan
from torchtune.modules.tokenizers import SentencePieceTokenizer, Tokenizer

# The Stanford Alpaca prompts, written out here independently of the library.
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def _prompt(r):
    return (
        WITH_INPUT.format(**r) if r.get("input") else NO_INPUT.format(instruction=r["instruction"])
    )


@pytest.fixture
def alpaca_file(tmp_path):
    return write_alpaca_json(tmp_path / "alpaca.json", n=8)


def _records(path):
    return json.loads(path.read_text())


# Answers that start with a digit, a word, punctuation, a space and a newline.
BOUNDARY_ANSWERS = ["111", "hello world", "!wow", ".", "Paris is big.", " 42", "\nfoo"]
BUNDLED_SP = Path(torchtune.__file__).parent / "assets" / "tiny" / "tokenizer.model"
TOKENIZER_KINDS = ["sp_tiny", "sp_bundled", "byte_bpe"]


@pytest.fixture(params=TOKENIZER_KINDS)
def kind(request):
    return request.param


@pytest.fixture
def tokenizers(request, kind):
    """(the tokenizer under test, its reference encode(text, add_bos, add_eos))."""
    if kind == "byte_bpe":
        return request.getfixturevalue("byte_bpe"), request.getfixturevalue("byte_bpe_reference")
    path = request.getfixturevalue("sp_model_path") if kind == "sp_tiny" else BUNDLED_SP
    sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode(text, add_bos=True, add_eos=True):
        return sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    return SentencePieceTokenizer(path), encode


@pytest.fixture
def boundary_file(tmp_path):
    records = _records(write_alpaca_json(tmp_path / "base.json", n=8))
    for i, answer in enumerate(BOUNDARY_ANSWERS):
        records.append({"instruction": "Answer this.", "input": "", "output": answer})
        records.append({"instruction": "Answer this.", "input": f"case {i}", "output": answer})
    path = tmp_path / "boundary.json"
    path.write_text(json.dumps(records))
    return path


def _n_masked(labels):
    n = 0
    while n < len(labels) and labels[n] == -100:
        n += 1
    return n


@pytest.mark.parametrize("train_on_input", [True, False])
def test_tokens_are_the_whole_texts_and_only_the_prompt_is_masked(
    tokenizers, boundary_file, hf_cache, train_on_input
):
    tok, reference = tokenizers
    ds = alpaca_dataset(
        tok,
        source="json",
        data_files=str(boundary_file),
        train_on_input=train_on_input,
        max_seq_len=None,
        cache_dir=hf_cache,
    )
    records = _records(boundary_file)
    assert len(ds) == len(records)
    assert {bool(r["input"]) for r in records} == {True, False}  # both template variants
    n_clean = 0
    for r, sample in zip(records, ds):
        prompt, answer = _prompt(r), r["output"]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens == reference(prompt + answer, add_bos=True, add_eos=True)
        assert tok.decode(tokens) == prompt + answer  # no space (or anything) in between
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        assert tokens.count(tok.eos_id) == 1
        if train_on_input:
            assert labels == tokens
            continue
        # Masked = the longest common prefix of the prompt's own tokens and the sample's.
        n = _n_masked(labels)
        assert labels == [-100] * n + tokens[n:]
        prompt_ids = reference(prompt, add_bos=True, add_eos=False)
        assert n <= len(prompt_ids) and tokens[:n] == prompt_ids[:n]
        assert n == len(prompt_ids) or tokens[n] != prompt_ids[n]
        if not answer[0].isspace():
            # The prompt ends in "\n": the boundary is clean and the scored tokens are exactly
            # the answer, the first without a word-boundary piece.
            assert n == len(prompt_ids)
            assert tok.decode(tokens[:n]) == prompt
            assert tok.decode(tokens[n:-1]) == answer
            n_clean += 1
    if not train_on_input:
        assert n_clean == len(records) - 4  # all but the " 42" and "\nfoo" rows


@pytest.mark.parametrize("kind", ["sp_tiny", "sp_bundled"])
def test_sentencepiece_answers_have_no_leading_word_boundary(tokenizers, boundary_file, hf_cache):
    # The symptom: encoded on its own, "111" became "▁1..." (a leading space the
    # model learned to print). Now the first scored piece is the answer's own first text.
    tok, _ = tokenizers
    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    ds = alpaca_dataset(
        tok,
        source="json",
        data_files=str(boundary_file),
        train_on_input=False,
        max_seq_len=None,
        cache_dir=hf_cache,
    )
    n_checked = 0
    for r, sample in zip(_records(boundary_file), ds):
        first = sample["tokens"][_n_masked(sample["labels"])]
        if not r["output"][0].isspace():
            assert not sp.id_to_piece(first).startswith("▁"), (r, sp.id_to_piece(first))
            assert sp.decode([first]) and r["output"].startswith(sp.decode([first]))
            n_checked += 1
    assert n_checked == len(ds) - 4


class SpaceEndedTemplate(InstructTemplate):
    """A prompt that ends in a space, so the first answer word merges with it."""

    required_fields = ("instruction",)

    @classmethod
    def format(cls, sample, column_map=None):
        return f"Q: {sample[cls.column('instruction', column_map)]} A: "


@pytest.mark.parametrize("kind", ["sp_tiny", "byte_bpe"])
def test_a_token_straddling_the_boundary_is_scored(tokenizers, tmp_path, hf_cache):
    # "A: " + "hello world": both tokenizers fold the space into the answer's first token
    # (SentencePiece "▁hello", byte-level " hello"), which the prompt alone does not have.
    tok, reference = tokenizers
    row = {"instruction": "say it", "output": "hello world"}
    path = tmp_path / "space.json"
    path.write_text(json.dumps([row]))
    sample = instruct_dataset(
        tok, "json", SpaceEndedTemplate, max_seq_len=None, data_files=str(path), cache_dir=hf_cache
    )[0]
    prompt = "Q: say it A: "
    prompt_ids = reference(prompt, add_bos=True, add_eos=False)
    tokens, labels = sample["tokens"], sample["labels"]
    assert tokens == reference(prompt + "hello world", add_bos=True, add_eos=True)
    n = len(prompt_ids) - 1  # the prompt's trailing-space token is not in the sample
    assert tokens[:n] == prompt_ids[:n] and tokens[n] != prompt_ids[n]
    assert labels == [-100] * n + tokens[n:]
    assert tok.decode(tokens[n : n + 1]).strip() == "hello"  # scored, and it is answer text


def test_a_merge_before_the_prompts_last_token_masks_only_the_common_prefix(tmp_path, hf_cache):
    # The bundled tokenizer ends the Alpaca prompt with a ":\n" piece, but prompt + "\nfoo"
    # with ":" and "\n\n": the ":" (prompt text) is scored too, since the prompt alone does not
    # produce that token in that place.
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED_SP))
    row = {"instruction": "Answer this.", "input": "", "output": "\nfoo"}
    path = tmp_path / "nl.json"
    path.write_text(json.dumps([row]))
    sample = alpaca_dataset(
        SentencePieceTokenizer(BUNDLED_SP),
        source="json",
        data_files=str(path),
        train_on_input=False,
        max_seq_len=None,
        cache_dir=hf_cache,
    )[0]
    prompt_ids = sp.encode(_prompt(row), add_bos=True)
    tokens, labels = sample["tokens"], sample["labels"]
    assert sp.id_to_piece(prompt_ids[-1]) == ":\n"
    n = len(prompt_ids) - 1
    assert tokens[:n] == prompt_ids[:n]
    assert sp.id_to_piece(tokens[n : n + 2]) == [":", "\n\n"]
    assert labels == [-100] * n + tokens[n:]


def test_packed_with_no_pad_id_pads_with_eos(byte_bpe, alpaca_file, hf_cache):
    # A tokenizer.json tokenizer with no padding token (Llama 3-like): packing pads with EOS,
    # and every padded position is unscored.
    assert isinstance(byte_bpe, Tokenizer)
    assert byte_bpe.pad_id is None and padding_id(byte_bpe) == byte_bpe.eos_id
    kwargs = dict(source="json", data_files=str(alpaca_file), cache_dir=hf_cache)
    unpacked = alpaca_dataset(byte_bpe, max_seq_len=160, train_on_input=False, **kwargs)
    packed = alpaca_dataset(byte_bpe, max_seq_len=160, train_on_input=False, packed=True, **kwargs)
    assert isinstance(packed, PackedDataset) and len(packed) < len(unpacked)
    lens = [len(unpacked[i]["tokens"]) for i in range(len(unpacked))]
    plan = pack_plan(lens, 160)
    assert len(plan) == len(packed)
    n_padded = 0
    for row, samples in zip(packed, plan):
        flat = [t for i in samples for t in unpacked[i]["tokens"]]
        pad = 160 - len(flat)
        assert row["tokens"] == flat + [byte_bpe.eos_id] * pad
        assert row["labels"][len(flat) :] == [-100] * pad
        n_padded += pad
    assert n_padded > 0


def test_truncation_keeps_the_head(sp_model_path, alpaca_file, hf_cache):
    tok = SentencePieceTokenizer(sp_model_path)
    full = alpaca_dataset(
        tok, source="json", data_files=str(alpaca_file), max_seq_len=None, cache_dir=hf_cache
    )
    lens = [len(s["tokens"]) for s in full]
    max_seq_len = sorted(lens)[len(lens) // 2]
    cut = alpaca_dataset(
        tok,
        source="json",
        data_files=str(alpaca_file),
        max_seq_len=max_seq_len,
        train_on_input=False,
        cache_dir=hf_cache,
    )
    for i, n in enumerate(lens):
        s = cut[i]
        assert len(s["tokens"]) == len(s["labels"]) == min(n, max_seq_len)
        assert s["tokens"] == full[i]["tokens"][:max_seq_len]
        # Untruncated samples end with EOS; truncated ones lose it (documented).
        assert (s["tokens"][-1] == tok.eos_id) == (n <= max_seq_len)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_file_formats_give_the_same_samples(sp_model_path, alpaca_file, hf_cache, tmp_path, fmt):
    tok = SentencePieceTokenizer(sp_model_path)
    ref = alpaca_dataset(tok, source="json", data_files=str(alpaca_file), cache_dir=hf_cache)
    table = datasets.Dataset.from_list(_records(alpaca_file))
    path = str(tmp_path / f"data.{fmt}")
    if fmt == "jsonl":
        table.to_json(path, lines=True)
        source = "json"
    elif fmt == "csv":
        table.to_csv(path, index=False)  # empty inputs come back as None: treated as no input
        source = "csv"
    else:
        table.to_parquet(path)
        source = "parquet"
    ds = alpaca_dataset(tok, source=source, data_files=path, cache_dir=hf_cache)
    assert [ds[i] for i in range(len(ds))] == [ref[i] for i in range(len(ref))]


@pytest.mark.parametrize(
    "template",
    ["torchtune.data.AlpacaInstructTemplate", AlpacaInstructTemplate, AlpacaInstructTemplate()],
)
def test_instruct_dataset_column_map(sp_model_path, alpaca_file, hf_cache, tmp_path, template):
    tok = SentencePieceTokenizer(sp_model_path)
    renamed = [
        {"prompt": r["instruction"], "context": r["input"], "answer": r["output"]}
        for r in _records(alpaca_file)
    ]
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(renamed))
    ds = instruct_dataset(
        tok,
        "json",
        template=template,
        column_map={"instruction": "prompt", "input": "context", "output": "answer"},
        max_seq_len=512,
        data_files=str(path),
        cache_dir=hf_cache,
    )
    ref = alpaca_dataset(
        tok, source="json", data_files=str(alpaca_file), train_on_input=False, cache_dir=hf_cache
    )
    assert isinstance(ds, InstructDataset) and len(ds) == len(ref)
    assert [ds[i] for i in range(len(ds))] == [ref[i] for i in range(len(ref))]


def test_hub_id_goes_through_load_dataset(monkeypatch, sp_model_path, alpaca_file):
    calls = []
    records = _records(alpaca_file)

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tok = SentencePieceTokenizer(sp_model_path)
    ds = alpaca_dataset(tok, split="train[:50%]", revision="abc")
    assert calls == [("tatsu-lab/alpaca", {"split": "train[:50%]", "revision": "abc"})]
    assert len(ds) == len(records)
    assert tok.decode(ds[0]["tokens"]) == _prompt(records[0]) + records[0]["output"]


def test_not_a_single_split_is_an_error(monkeypatch, sp_model_path, alpaca_file):
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, **kw: datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(_records(alpaca_file))}
        ),
    )
    with pytest.raises(ValueError, match="single map-style split"):
        alpaca_dataset(SentencePieceTokenizer(sp_model_path), split=None)


def _write(tmp_path, records):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return str(path)


GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


@pytest.mark.parametrize(
    "bad_row, match",
    [
        ({"instruction": "Say hi.", "input": ""}, r"row 2, column 'output' is missing"),
        ({"instruction": "Say hi.", "input": "", "output": ""}, r"row 2, column 'output' is empty"),
        (
            {"instruction": "Say hi.", "input": "", "output": "  \n"},
            r"row 2, column 'output' is empty",
        ),
        (
            {"instruction": "Say hi.", "input": "", "output": 7},
            r"row 2, column 'output' is of type int",
        ),
        (
            {"instruction": None, "input": "", "output": "x"},
            r"row 2, column 'instruction' is missing",
        ),
        (
            {"instruction": "Say hi.", "input": ["a"], "output": "x"},
            r"row 2, column 'input' is of type list",
        ),
    ],
)
def test_bad_rows_name_row_and_column(sp_model_path, tmp_path, hf_cache, bad_row, match):
    tok = SentencePieceTokenizer(sp_model_path)
    path = _write(tmp_path, [GOOD, GOOD, bad_row, GOOD])
    with pytest.raises(ValueError, match=match):
        alpaca_dataset(tok, source="json", data_files=path, cache_dir=hf_cache)


def test_missing_column_names_it(sp_model_path, tmp_path, hf_cache):
    tok = SentencePieceTokenizer(sp_model_path)
    path = _write(tmp_path, [{"instruction": "a", "input": "", "response": "b"}])
    with pytest.raises(ValueError, match=r"\['output'\] missing from every row \(row 0"):
        alpaca_dataset(tok, source="json", data_files=path, cache_dir=hf_cache)
    with pytest.raises(ValueError, match="column_map keys"):
        instruct_dataset(
            tok,
            "json",
            AlpacaInstructTemplate,
            column_map={"answer": "response"},
            data_files=path,
            cache_dir=hf_cache,
        )


def test_bad_template_is_an_error(sp_model_path, alpaca_file, hf_cache):
    tok = SentencePieceTokenizer(sp_model_path)
    with pytest.raises(ValueError, match="torchtune.data.NoSuchTemplate"):
        instruct_dataset(
            tok,
            "json",
            "torchtune.data.NoSuchTemplate",
            data_files=str(alpaca_file),
            cache_dir=hf_cache,
        )
    with pytest.raises(ValueError, match="must be an InstructTemplate"):
        instruct_dataset(
            tok,
            "json",
            "torchtune.data.padded_collate",
            data_files=str(alpaca_file),
            cache_dir=hf_cache,
        )


def test_skip_bad_rows_reports_the_count(sp_model_path, tmp_path, hf_cache, caplog):
    tok = SentencePieceTokenizer(sp_model_path)
    rows = [
        GOOD,
        {**GOOD, "output": ""},
        {**GOOD, "instruction": "Say bye.", "output": "bye"},
        {**GOOD, "output": 3},
        {"instruction": "x", "input": ""},
    ]
    path = _write(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        ds = alpaca_dataset(
            tok, source="json", data_files=path, skip_bad_rows=True, cache_dir=hf_cache
        )
    assert ds.num_skipped == 3 and len(ds) == 2
    assert "skipped 3 of 5 rows" in caplog.text
    assert tok.decode(ds[1]["tokens"]).endswith("Say bye.\n\n### Response:\nbye")
    all_bad = _write(tmp_path, [{**GOOD, "output": ""}])
    with pytest.raises(ValueError, match="all 1 rows are bad"):
        alpaca_dataset(
            tok, source="json", data_files=all_bad, skip_bad_rows=True, cache_dir=hf_cache
        )


def test_index_errors(sp_model_path, alpaca_file, hf_cache):
    ds = alpaca_dataset(
        SentencePieceTokenizer(sp_model_path),
        source="json",
        data_files=str(alpaca_file),
        cache_dir=hf_cache,
    )
    assert ds[-1] == ds[len(ds) - 1]
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="max_seq_len"):
        alpaca_dataset(
            SentencePieceTokenizer(sp_model_path),
            source="json",
            data_files=str(alpaca_file),
            max_seq_len=0,
        )
    with pytest.raises(ValueError, match="packed=True needs a max_seq_len"):
        instruct_dataset(
            SentencePieceTokenizer(sp_model_path),
            "json",
            AlpacaInstructTemplate,
            max_seq_len=None,
            packed=True,
            data_files=str(alpaca_file),
            cache_dir=hf_cache,
        )


def test_prompt_labels_are_the_one_ignore_value(sp_model_path, alpaca_file, hf_cache, monkeypatch):
    # The dataset writes torchtune.data.CROSS_ENTROPY_IGNORE_IDX, not a literal of its own:
    # with the constant changed, every prompt label follows it.
    from torchtune.datasets import _instruct

    tok = SentencePieceTokenizer(sp_model_path)
    kwargs = dict(source="json", data_files=str(alpaca_file), max_seq_len=None, cache_dir=hf_cache)
    want = list(alpaca_dataset(tok, train_on_input=False, **kwargs))  # tokenized lazily
    monkeypatch.setattr(_instruct, "CROSS_ENTROPY_IGNORE_IDX", -7)
    got = list(alpaca_dataset(tok, train_on_input=False, **kwargs))
    assert len(want) == len(got) > 0
    for a, b in zip(want, got):
        assert -100 in a["labels"]
        assert b["labels"] == [-7 if x == -100 else x for x in a["labels"]]
