# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""preference_dataset: each side as the chat / instruct datasets render it, only the final answer
scored, errors that name the row and the column, and the pair collate."""

import json

import pytest
import torch

from tests.tokenizer_fixtures import build_hf_tokenizer_dir
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate, padded_collate_pairs
from torchtune.datasets import chat_dataset, instruct_dataset, preference_dataset
from torchtune.models import hf_tokenizer
from torchtune.modules.tokenizers import SentencePieceTokenizer

IGNORE = CROSS_ENTROPY_IGNORE_IDX


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return hf_tokenizer(
        build_hf_tokenizer_dir(tmp_path_factory.mktemp("tok"), "byte_bpe", "chatml")
    )


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": c} for r, c in zip(roles, turns)]


CONV_ROWS = [
    {
        "chosen": _conv("What is two and two?", "Four."),
        "rejected": _conv("What is two and two?", "Five, surely."),
    },
    {
        "chosen": _conv("Hi there.", "Hello!", "Name a colour.", "Blue."),
        "rejected": _conv("Hi there.", "Hello!", "Name a colour.", "A dog."),
    },
]


def test_conversation_sides_as_chat_dataset_with_only_the_last_answer_scored(
    chat_tokenizer, tmp_path
):
    data = _write(
        tmp_path / "pairs.jsonl",
        CONV_ROWS,
    )
    ds = preference_dataset(chat_tokenizer, source="json", data_files=data)
    assert ds.conversational and len(ds) == 2
    for side in ("chosen", "rejected"):
        sft = chat_dataset(
            chat_tokenizer,
            source="json",
            data_files=_write(
                tmp_path / f"{side}.jsonl", [{"messages": r[side]} for r in CONV_ROWS]
            ),
        )
        for i, row in enumerate(CONV_ROWS):
            ours, ref = ds[i], sft[i]
            assert ours[f"{side}_tokens"] == ref["tokens"]
            # The prompt, rendered up to the answer's header, is never scored.
            prompt, _ = chat_tokenizer.tokenize_messages(row[side][:-1], add_generation_prompt=True)
            n = len(prompt)
            expected = [IGNORE] * n + ref["labels"][n:]
            assert ours[f"{side}_labels"] == expected
            assert any(label != IGNORE for label in expected)
    # Row 1's first answer ("Hello!") is scored by chat_dataset but not here.
    assert sum(lbl != IGNORE for lbl in ds[1]["chosen_labels"]) < sum(
        lbl != IGNORE for lbl in sft[1]["labels"]
    )


def test_train_on_input_scores_everything(chat_tokenizer, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", CONV_ROWS)
    ds = preference_dataset(chat_tokenizer, source="json", data_files=data, train_on_input=True)
    assert ds[1]["chosen_labels"] == ds[1]["chosen_tokens"]


STRING_ROWS = [
    {"question": "Say hello.", "good": "Hello there.", "bad": "Go away.", "input": ""},
    {"question": "Count to three.", "good": "One, two, three.", "bad": "Four.", "input": ""},
]


@pytest.fixture(scope="module")
def sp_tokenizer(sp_model_path):
    return SentencePieceTokenizer(str(sp_model_path))


def test_string_sides_as_instruct_dataset(sp_tokenizer, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", STRING_ROWS)
    column_map = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    ds = preference_dataset(
        sp_tokenizer, source="json", data_files=data, column_map=column_map, max_seq_len=40
    )
    assert not ds.conversational
    for side, column in (("chosen", "good"), ("rejected", "bad")):
        ref = instruct_dataset(
            sp_tokenizer,
            source="json",
            data_files=data,
            template="torchtune.data.AlpacaInstructTemplate",
            column_map={"instruction": "question", "output": column},
            max_seq_len=40,
        )
        for i in range(len(STRING_ROWS)):
            assert ds[i][f"{side}_tokens"] == ref[i]["tokens"]
            assert ds[i][f"{side}_labels"] == ref[i]["labels"]


def test_pair_collate_is_chosen_rows_then_rejected_rows(sp_tokenizer, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", STRING_ROWS)
    ds = preference_dataset(
        sp_tokenizer,
        source="json",
        data_files=data,
        column_map={"prompt": "question", "chosen": "good", "rejected": "bad"},
    )
    samples = [ds[0], ds[1]]
    batch = padded_collate_pairs(samples, padding_idx=0)
    rows = [
        {"tokens": s[f"{k}_tokens"], "labels": s[f"{k}_labels"]}
        for k in ("chosen", "rejected")
        for s in samples
    ]
    expected = padded_collate(rows, padding_idx=0)
    assert set(batch) == {"tokens", "labels"}
    torch.testing.assert_close(batch["tokens"], expected["tokens"], rtol=0, atol=0)
    torch.testing.assert_close(batch["labels"], expected["labels"], rtol=0, atol=0)
    assert batch["tokens"].shape[0] == 4
    with pytest.raises(ValueError, match=r"sample 1 of the batch lacks \['rejected_labels'\]"):
        padded_collate_pairs([ds[0], {k: v for k, v in ds[1].items() if k != "rejected_labels"}])
    with pytest.raises(ValueError, match="empty batch"):
        padded_collate_pairs([])


def test_different_prompts_name_the_row_and_column(chat_tokenizer, tmp_path):
    rows = [CONV_ROWS[0], {"chosen": _conv("A?", "Yes."), "rejected": _conv("B?", "No.")}]
    data = _write(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 1: column 'rejected': its prompt .* differs"):
        preference_dataset(chat_tokenizer, source="json", data_files=data)


def test_missing_column_names_row_0_and_the_column(sp_tokenizer, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match=r"row 0: column 'rejected' \(rejected\) missing"):
        preference_dataset(sp_tokenizer, source="json", data_files=data)
    data = _write(tmp_path / "pairs2.jsonl", [{"chosen": "b", "rejected": "c"}])
    with pytest.raises(ValueError, match=r"row 0: column 'prompt' \(prompt\) missing"):
        preference_dataset(sp_tokenizer, source="json", data_files=data)


def test_bad_values_name_the_row_and_column(sp_tokenizer, chat_tokenizer, tmp_path):
    data = _write(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a", "chosen": "b", "rejected": None},
        ],
    )
    with pytest.raises(
        ValueError, match=r"row 1: column 'rejected': expected a string, got NoneType"
    ):
        preference_dataset(sp_tokenizer, source="json", data_files=data)
    rows = [CONV_ROWS[0], {"chosen": _conv("A?", "Yes."), "rejected": _conv("A?")}]
    data = _write(tmp_path / "conv.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 1: column 'rejected': .* not end in an assistant"):
        preference_dataset(chat_tokenizer, source="json", data_files=data)
    with pytest.raises(ValueError, match=r"column_map keys \['answer'\]"):
        preference_dataset(sp_tokenizer, source="json", data_files=data, column_map={"answer": "x"})
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        preference_dataset(
            sp_tokenizer, source="json", data_files=_write(tmp_path / "c.jsonl", CONV_ROWS)
        )


def test_rewritten_turns_is_passed_to_the_tokenizer(tmp_path):
    """Qwen 3's template renders an earlier answer differently once later turns follow: a
    multi-turn prompt raises (naming the row) unless ``rewritten_turns="as_rendered"``, and
    then each side is ``tokenize_messages(..., rewritten_turns="as_rendered")``."""
    from tests.tokenizer_fixtures import QWEN3_LIKE_TEMPLATE

    tok = hf_tokenizer(
        build_hf_tokenizer_dir(
            tmp_path / "tok", "byte_bpe", "chatml", chat_template=QWEN3_LIKE_TEMPLATE
        )
    )
    data = _write(tmp_path / "pairs.jsonl", CONV_ROWS)
    with pytest.raises(ValueError, match="row 1"):
        preference_dataset(tok, source="json", data_files=data)[1]
    ds = preference_dataset(tok, source="json", data_files=data, rewritten_turns="as_rendered")
    for side in ("chosen", "rejected"):
        tokens, _ = tok.tokenize_messages(CONV_ROWS[1][side], rewritten_turns="as_rendered")
        assert ds[1][f"{side}_tokens"] == tokens
        scored = [t for t, lbl in zip(tokens, ds[1][f"{side}_labels"]) if lbl != IGNORE]
        answer = CONV_ROWS[1][side][-1]["content"]
        assert answer in tok.decode(scored) and "Hello!" not in tok.decode(scored)
