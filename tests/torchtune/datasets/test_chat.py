# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""chat_dataset: rows -> the tokenizer's chat rendering and mask, errors that name the row,
truncation, sources, and packed vs unpacked per-token losses of a model."""

import json
from unittest import mock

import datasets
import pytest
import torch

from tests.test_utils import sample_conversations, write_chat_jsonl
from tests.tokenizer_fixtures import build_hf_tokenizer_dir
from tests.torchtune.datasets.test_packed import _per_token_losses
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate, padding_id
from torchtune.datasets import ChatDataset, PackedDataset, chat_dataset
from torchtune.datasets._packed import pack_plan
from torchtune.models import hf_tokenizer
from torchtune.models.llama2 import llama2
from torchtune.modules.tokenizers import SentencePieceTokenizer, truncate_chat

IGNORE = CROSS_ENTROPY_IGNORE_IDX


@pytest.fixture(scope="module", params=[("byte_bpe", "chatml"), ("metaspace", "gemma")])
def tokenizer(request, tmp_path_factory):
    kind, template = request.param
    return hf_tokenizer(build_hf_tokenizer_dir(tmp_path_factory.mktemp("tok"), kind, template))


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    return hf_tokenizer(build_hf_tokenizer_dir(tmp_path_factory.mktemp("l3"), "byte_bpe", "llama3"))


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _expected(tokenizer, messages, train_on_input=False):
    tokens, mask = tokenizer.tokenize_messages(messages)
    labels = list(tokens) if train_on_input else [IGNORE if m else t for t, m in zip(tokens, mask)]
    return {"tokens": tokens, "labels": labels}


def test_rows_are_the_tokenizers_rendering_and_mask(tokenizer, tmp_path):
    path = write_chat_jsonl(tmp_path / "c.jsonl", n=8)
    conversations = sample_conversations(8)
    for train_on_input in (False, True):
        ds = chat_dataset(
            tokenizer, source="json", data_files=str(path), train_on_input=train_on_input
        )
        assert isinstance(ds, ChatDataset) and len(ds) == 8
        for i, messages in enumerate(conversations):
            assert ds[i] == _expected(tokenizer, messages, train_on_input), i
        if not train_on_input:
            # Every conversation has scored and masked tokens, and multi-turn ones several runs.
            labels = ds[0]["labels"]
            assert IGNORE in labels and any(t != IGNORE for t in labels)
    assert ds[-1] == ds[7]
    with pytest.raises(IndexError, match="out of range"):
        ds[8]


def test_sharegpt_rows_equal_their_openai_twins(tokenizer, tmp_path):
    openai = chat_dataset(
        tokenizer, source="json", data_files=str(write_chat_jsonl(tmp_path / "o.jsonl", n=6))
    )
    sharegpt = chat_dataset(
        tokenizer,
        source=str(write_chat_jsonl(tmp_path / "s.jsonl", n=6, style="sharegpt")),
        conversation_style="sharegpt",
        conversation_column="conversations",
    )
    assert [sharegpt[i] for i in range(6)] == [openai[i] for i in range(6)]


def test_local_parquet_and_hub_sources(tokenizer, tmp_path):
    conversations = sample_conversations(4)
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_list([{"messages": m} for m in conversations]).to_parquet(str(parquet))
    ds = chat_dataset(tokenizer, source=str(parquet))
    assert [ds[i] for i in range(4)] == [_expected(tokenizer, m) for m in conversations]
    # A hub id goes to datasets.load_dataset as is: patch only that network edge.
    hub = datasets.Dataset.from_list([{"messages": m} for m in conversations])
    with mock.patch("datasets.load_dataset", return_value=hub) as load:
        ds = chat_dataset(tokenizer, source="org/chats", split="train_sft", revision="abc")
    load.assert_called_once_with("org/chats", split="train_sft", revision="abc")
    assert ds[3] == _expected(tokenizer, conversations[3])


def test_new_system_prompt_replaces_every_system_message(tokenizer, tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "old"}, *sample_conversations(1)[0][-2:]]},
        {"messages": sample_conversations(1, seed=3)[0][-2:]},
    ]
    ds = chat_dataset(
        tokenizer,
        source=str(_write_rows(tmp_path / "c.jsonl", rows)),
        new_system_prompt="Be brief.",
    )
    for i, row in enumerate(rows):
        rest = [m for m in row["messages"] if m["role"] != "system"]
        assert ds[i] == _expected(tokenizer, [{"role": "system", "content": "Be brief."}, *rest])


_GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
_LIST = [{"type": "text", "text": "q"}]


@pytest.mark.parametrize(
    "rows, problem",
    [
        (
            [_GOOD, {"messages": []}],
            "row 1: the conversation must be a non-empty list of messages, got an empty list",
        ),
        (
            [_GOOD, {"messages": [{"role": "robot", "content": "hi"}]}],
            r"row 1: message 0 has role='robot'",
        ),
        (
            [_GOOD, {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}],
            r"row 1: message 0 \(user\) has no 'content'",
        ),
        (
            [_GOOD, {"messages": [{"role": "user", "content": "only a question"}]}],
            "row 1: the conversation has no assistant message",
        ),
        # Arrow gives a column one type, so these rows sit in files of their own (row 0).
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": _LIST},
                        {"role": "assistant", "content": _LIST},
                    ]
                }
            ],
            r"row 0: message 0 \(user\) has non-string \(list\) 'content'",
        ),
        ([{"messages": ["hello"]}], "row 0: message 0 is str, not a mapping"),
    ],
)
def test_malformed_rows_name_the_row_and_problem(tokenizer, tmp_path, rows, problem):
    path = _write_rows(tmp_path / "c.jsonl", rows)
    with pytest.raises(ValueError, match=rf"c\.jsonl: {problem}"):
        chat_dataset(tokenizer, source=str(path))


def test_sharegpt_unknown_role_and_missing_column(tokenizer, tmp_path):
    path = _write_rows(tmp_path / "s.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(ValueError, match=r"row 0: message 0 has from='bot'; ShareGPT roles"):
        chat_dataset(
            tokenizer,
            source=str(path),
            conversation_style="sharegpt",
            conversation_column="conversations",
        )
    with pytest.raises(
        ValueError, match=r"column 'messages' missing .* columns \['conversations'\]"
    ):
        chat_dataset(tokenizer, source=str(path))
    with pytest.raises(ValueError, match="conversation_style must be one of"):
        chat_dataset(tokenizer, source=str(path), conversation_style="alpaca")


def test_template_errors_name_the_row(tmp_path):
    # Gemma's template raises on roles that do not alternate user/assistant.
    tok = hf_tokenizer(build_hf_tokenizer_dir(tmp_path / "g", "metaspace", "gemma"))
    bad = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    rows = [{"messages": sample_conversations(1)[0]}, {"messages": bad}]
    ds = chat_dataset(tok, source=str(_write_rows(tmp_path / "c.jsonl", rows)))
    ds[0]
    with pytest.raises(ValueError, match=r"c\.jsonl: row 1: .*alternate"):
        ds[1]


def test_sentencepiece_tokenizer_is_refused(tmp_path):
    from tests.test_utils import train_sentencepiece

    tok = SentencePieceTokenizer(train_sentencepiece(tmp_path / "sp"))
    with pytest.raises(
        ValueError, match="chat template .*hf_tokenizer; got SentencePieceTokenizer"
    ):
        chat_dataset(tok, source=str(write_chat_jsonl(tmp_path / "c.jsonl", n=2)))


def test_truncation_masks_the_turn_it_cuts(llama3_tokenizer, tmp_path):
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer here"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "a second answer that is long enough to be cut " * 3},
    ]
    path = _write_rows(tmp_path / "c.jsonl", [{"messages": messages}])
    whole = _expected(llama3_tokenizer, messages)
    scored = [i for i, l in enumerate(whole["labels"]) if l != IGNORE]
    # The second answer's scored run: after the first gap in the scored positions.
    gap = next(k for k in range(1, len(scored)) if scored[k] != scored[k - 1] + 1)
    first_run, second_run = scored[:gap], scored[gap:]
    cut = second_run[0] + 3  # inside the second answer
    ds = chat_dataset(llama3_tokenizer, source=str(path), max_seq_len=cut)
    got = ds[0]
    assert got["tokens"] == whole["tokens"][:cut]
    # The first answer is learned as before; the cut one not at all.
    assert got["labels"] == whole["labels"][: second_run[0]] + [IGNORE] * 3
    assert [i for i, l in enumerate(got["labels"]) if l != IGNORE] == first_run
    # A cut right after a stop token keeps that turn whole.
    ds = chat_dataset(llama3_tokenizer, source=str(path), max_seq_len=first_run[-1] + 1)
    assert ds[0]["labels"] == whole["labels"][: first_run[-1] + 1]
    assert (
        truncate_chat(whole["tokens"], [l == IGNORE for l in whole["labels"]], cut)[0]
        == got["tokens"]
    )


def test_packed_chat_losses_match_unpacked(llama3_tokenizer, tmp_path):
    tok = llama3_tokenizer
    path = write_chat_jsonl(tmp_path / "c.jsonl", n=8, seed=1)
    max_seq_len = 320
    unpacked = chat_dataset(tok, source=str(path), max_seq_len=max_seq_len)
    packed = chat_dataset(tok, source=str(path), max_seq_len=max_seq_len, packed=True)
    assert isinstance(packed, PackedDataset)
    lens = [len(unpacked[i]["tokens"]) for i in range(len(unpacked))]
    assert max(lens) < max_seq_len and len(packed) < len(unpacked)  # rows hold several samples

    torch.manual_seed(0)
    model = llama2(
        vocab_size=tok.vocab_size,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=max_seq_len,
        intermediate_dim=88,
    ).eval()
    pad = padding_id(tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        ref = _per_token_losses(
            model, padded_collate([unpacked[i] for i in range(len(unpacked))], pad)
        )
        got = _per_token_losses(model, padded_collate([packed[i] for i in range(len(packed))], pad))

    n_compared = 0
    for r, row in enumerate(pack_plan(lens, max_seq_len, "best_fit")):
        off = 0
        for i in row:
            n = lens[i]
            # Masked positions give 0 in both, so this compares the scored tokens and the mask.
            torch.testing.assert_close(
                got[r, off : off + n - 1], ref[i, : n - 1], atol=1e-5, rtol=0
            )
            off += n
            n_compared += 1
        assert (got[r, off:] == 0).all()
    assert n_compared == len(lens)
    assert (ref > 0).sum() == (got > 0).sum() > 0
