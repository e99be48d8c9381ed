# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The tokenizer files of a model folder (training.tokenizer_output_files): transformers'
AutoTokenizer on the written folder encodes as our tokenizer did, and its chat template
(apply_chat_template) gives the token ids the training dataset gave."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.test_utils import (
    sample_conversations,
    sample_corpus,
    tiny_hf_llama,
    train_sentencepiece,
    write_alpaca_json,
    write_chat_jsonl,
)
from tests.tokenizer_fixtures import build_hf_tokenizer_dir
from torchtune import training
from torchtune.data import AlpacaInstructTemplate, InstructTemplate, instruct_chat_template
from torchtune.datasets import (
    alpaca_dataset,
    chat_dataset,
    instruct_dataset,
    preference_dataset,
    text_completion_dataset,
)
from torchtune.models import hf_tokenizer
from torchtune.models.llama2 import llama2_tokenizer
from torchtune.modules.tokenizers._sp_to_hf import sentencepiece_settings, unsupported_reason
from torchtune.utils import FullModelHFCheckpointer

BUNDLED_SP = Path(training.__file__).parents[1] / "assets" / "tiny" / "tokenizer.model"
ODD_TEXTS = [
    "",
    " ",
    "   lead",
    "trail  ",
    "a  b\t\tc",
    "\n\nlead newline",
    "x\n\ny\r\nz",
    "héllo wörld 😀 日本語 ß",
    # Not "<s>" inside a text: transformers turns it into the BOS id (as for Llama 2's own
    # tokenizer.json), SentencePiece encodes its characters.
    "### Response:\n10",
    "12345 + 678 = 13023",
]


def _write(files, folder: Path) -> Path:
    """What the checkpointer does with the files (see test_checkpointer_writes_them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copy(source, target)
        else:
            target.write_text(source)
    return folder


def _cfg(max_seq_len=None):
    return OmegaConf.create({"model": {"max_seq_len": max_seq_len}} if max_seq_len else {})


def _auto(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def sp_identity(tmp_path_factory):
    return train_sentencepiece(
        tmp_path_factory.mktemp("sp") / "m", normalization_rule_name="identity"
    )


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    return write_alpaca_json(tmp_path_factory.mktemp("alpaca") / "a.json", n=24)


def _alpaca_texts(path: Path):
    rows = json.loads(path.read_text())
    return [AlpacaInstructTemplate.format(r) + r["output"] for r in rows]


def _instruct_messages(row):
    return [
        {"role": "user", "content": row["instruction"], "input": row["input"]},
        {"role": "assistant", "content": row["output"]},
    ]


@pytest.mark.parametrize("which", ["bundled", "trained"])
def test_sentencepiece_folder_encodes_and_decodes_as_ours(
    which, sp_identity, alpaca_file, tmp_path
):
    path = BUNDLED_SP if which == "bundled" else sp_identity
    ours = llama2_tokenizer(path)
    ds = text_completion_dataset(ours, "json", data_files=str(alpaca_file), column="output")
    folder = _write(training.tokenizer_output_files(_cfg(256), ours, ds), tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    auto = _auto(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == auto.model_max_length == 256
    assert "chat_template" not in config  # text completion has no prompt format
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (1, 2, 0)
    texts = sample_corpus(300, seed=3) + _alpaca_texts(alpaca_file) + ODD_TEXTS
    for text in texts:
        ids = ours.encode(text, add_bos=True, add_eos=False)
        assert auto(text)["input_ids"] == ids, repr(text)
        # Special tokens inside the text split it; every piece starts a word, as our encode
        # starts every text: what apply_chat_template's "<s>...</s>" needs.
        assert auto(f"<s>{text}</s>", add_special_tokens=False)["input_ids"] == ids + [2]
        assert auto.decode(ids, skip_special_tokens=True) == ours.decode(ids), repr(text)
    # Our own HF tokenizer reads the folder the same way (generate / eval on the output).
    ours_hf = hf_tokenizer(folder)
    assert [ours_hf.encode(t) for t in texts] == [ours.encode(t) for t in texts]


def test_sentencepiece_settings_are_read_from_the_file(sp_identity, tmp_path):
    assert sentencepiece_settings(sp_identity) == {
        "model_type": 2,
        "name": "identity",
        "add_dummy_prefix": True,
        "remove_extra_whitespaces": False,
    }
    assert unsupported_reason(sp_identity) is None
    nfkc = train_sentencepiece(tmp_path / "nfkc")
    assert unsupported_reason(nfkc) == "normalization 'nmt_nfkc' (only identity)"
    with pytest.raises(ValueError, match="not a SentencePiece model file"):
        (tmp_path / "bad.model").write_bytes(b"\xff\xff\xff")
        sentencepiece_settings(tmp_path / "bad.model")


def test_unconvertible_sentencepiece_gets_config_only(tmp_path, alpaca_file, caplog):
    nfkc = train_sentencepiece(tmp_path / "nfkc")
    ds = alpaca_dataset(llama2_tokenizer(nfkc), source="json", data_files=str(alpaca_file))
    with caplog.at_level(logging.WARNING):
        files = training.tokenizer_output_files(_cfg(), llama2_tokenizer(nfkc), ds)
    assert "no tokenizer.json" in caplog.text and "nmt_nfkc" in caplog.text
    assert sorted(files) == ["tokenizer.model", "tokenizer_config.json"]
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"] == instruct_chat_template(AlpacaInstructTemplate)


@pytest.mark.parametrize("which", ["bundled", "trained"])
@pytest.mark.parametrize("packed", [False, True])
def test_alpaca_chat_template_gives_the_dataset_tokens(
    which, packed, sp_identity, alpaca_file, tmp_path
):
    path = BUNDLED_SP if which == "bundled" else sp_identity
    ours = llama2_tokenizer(path)
    kwargs = dict(source="json", data_files=str(alpaca_file), max_seq_len=None)
    ds = alpaca_dataset(ours, **kwargs)
    train_ds = alpaca_dataset(ours, **{**kwargs, "max_seq_len": 512}, packed=True) if packed else ds
    auto = _auto(_write(training.tokenizer_output_files(_cfg(), ours, train_ds), tmp_path / "m"))
    rows = json.loads(alpaca_file.read_text())
    assert {bool(r["input"]) for r in rows} == {True, False}  # both Alpaca variants
    for i, row in enumerate(rows):
        messages = _instruct_messages(row)
        text = auto.apply_chat_template(messages, tokenize=False)
        assert text == "<s>" + AlpacaInstructTemplate.format(row) + row["output"] + "</s>"
        assert auto.apply_chat_template(messages, return_dict=False) == ds[i]["tokens"]
        # A front end asks with the user turn alone: the prompt, ready for the answer.
        prompt = auto.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        assert prompt == "<s>" + AlpacaInstructTemplate.format(row)


def test_alpaca_template_on_hf_tokenizer_gives_the_dataset_tokens(alpaca_file, tmp_path):
    # A tokenizer.json model (ChatML, no BOS) trained on Alpaca: the Alpaca template replaces
    # its own, and an input chat_template.jinja (which transformers prefers) is not copied.
    src = build_hf_tokenizer_dir(tmp_path / "qwen", "byte_bpe", "chatml", template_storage="jinja")
    ours = hf_tokenizer(src)
    ds = alpaca_dataset(ours, source="json", data_files=str(alpaca_file), max_seq_len=None)
    folder = _write(training.tokenizer_output_files(_cfg(), ours, ds), tmp_path / "m")
    assert not (folder / "chat_template.jinja").exists()
    auto = _auto(folder)
    assert auto.chat_template == instruct_chat_template(AlpacaInstructTemplate)
    for i, row in enumerate(json.loads(alpaca_file.read_text())):
        ids = auto.apply_chat_template(_instruct_messages(row), return_dict=False)
        assert ids == ds[i]["tokens"]
        assert ids[-1] == ours.eos_id and ours.bos_id is None
    texts = sample_corpus(100, seed=5) + ODD_TEXTS
    assert [auto(t)["input_ids"] for t in texts] == [ours.encode(t, False, False) for t in texts]


@pytest.mark.parametrize("kind,template", [("byte_bpe", "llama3"), ("byte_bpe", "chatml")])
@pytest.mark.parametrize("storage", ["config", "jinja"])
def test_chat_dataset_keeps_the_tokenizer_template(kind, template, storage, tmp_path):
    src = build_hf_tokenizer_dir(tmp_path / "tok", kind, template, template_storage=storage)
    ours = hf_tokenizer(src)
    data = write_chat_jsonl(tmp_path / "chats.jsonl", n=8, seed=2)
    ds = chat_dataset(ours, source=str(data))
    folder = _write(training.tokenizer_output_files(_cfg(), ours, ds), tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ours.chat_template
    auto = _auto(folder)
    for i, messages in enumerate(sample_conversations(8, seed=2)):
        assert auto.apply_chat_template(messages, return_dict=False) == ds[i]["tokens"]


def test_preference_rows_pick_the_template(sp_identity, tmp_path):
    ours = llama2_tokenizer(sp_identity)
    pairs = [{"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "7"}] * 3
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    ds = preference_dataset(ours, source="json", data_files=str(tmp_path / "pairs.json"))
    auto = _auto(_write(training.tokenizer_output_files(_cfg(), ours, ds), tmp_path / "m"))
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    assert auto.apply_chat_template(messages, return_dict=False) == ds[0]["chosen_tokens"]

    hf = hf_tokenizer(build_hf_tokenizer_dir(tmp_path / "tok", "byte_bpe", "chatml"))
    conv = [{"chosen": messages, "rejected": [messages[0], {"role": "assistant", "content": "7"}]}]
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    ds = preference_dataset(hf, source="json", data_files=str(tmp_path / "conv.json"))
    assert training.training_chat_template(hf, ds) == hf.chat_template


class _TwoFields(InstructTemplate):
    required_fields = ("question", "context")
    optional_fields = ()

    @classmethod
    def format(cls, sample, column_map=None):
        return f"Context: {sample['context']}\nQ: {sample['question']} {{not jinja}} 'q' \\\nA:"


def test_custom_instruct_template(sp_identity, tmp_path):
    rows = [{"question": f"what is {i}?", "context": f"c{i}", "output": f" {i}"} for i in range(4)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    ours = llama2_tokenizer(sp_identity)
    ds = instruct_dataset(
        ours, "json", template=_TwoFields, data_files=str(tmp_path / "rows.json"), max_seq_len=None
    )
    auto = _auto(_write(training.tokenizer_output_files(_cfg(), ours, ds), tmp_path / "m"))
    for i, row in enumerate(rows):
        messages = [
            {"role": "user", "content": row["question"], "context": row["context"]},
            {"role": "assistant", "content": row["output"]},
        ]
        assert auto.apply_chat_template(messages, return_dict=False) == ds[i]["tokens"]
    with pytest.raises(Exception, match="needs the key context"):
        auto.apply_chat_template([{"role": "user", "content": "q"}])
    with pytest.raises(Exception, match="only user and assistant turns, got a system"):
        auto.apply_chat_template([{"role": "system", "content": "s"}])

    class TwoOptional(_TwoFields):
        optional_fields = ("a", "b")

    with pytest.raises(ValueError, match="at most one optional field"):
        instruct_chat_template(TwoOptional)

    class Twice(_TwoFields):
        @classmethod
        def format(cls, sample, column_map=None):
            return f"{sample['question']} {sample['question']} {sample['context']}"

    with pytest.raises(ValueError, match="does not place field 'question' once"):
        instruct_chat_template(Twice)


def test_checkpointer_writes_them(sp_identity, alpaca_file, tmp_path):
    ckpt_dir = tmp_path / "hf"
    tiny_hf_llama(vocab_size=400).save_pretrained(ckpt_dir, safe_serialization=True)
    # A decoy tokenizer in the checkpoint folder: the run's tokenizer replaces it.
    (ckpt_dir / "tokenizer.json").write_text("decoy")
    ckpt = FullModelHFCheckpointer(ckpt_dir, ["model.safetensors"], output_dir=tmp_path / "out")
    sd = ckpt.load_checkpoint()
    out = ckpt.save_checkpoint(sd, epoch=0)
    assert (out / "tokenizer.json").read_text() == "decoy"  # no hook: copied as before

    ours = llama2_tokenizer(sp_identity)
    ds = alpaca_dataset(ours, source="json", data_files=str(alpaca_file))
    files = training.tokenizer_output_files(_cfg(), ours, ds)
    ckpt.set_model_folder_files(files)
    out = ckpt.save_checkpoint(sd, epoch=1)
    for name, source in files.items():
        written = (out / name).read_bytes()
        assert written == (source.read_bytes() if isinstance(source, Path) else source.encode())
    assert (out / "config.json").read_bytes() == (ckpt_dir / "config.json").read_bytes()
    assert (
        _auto(out).apply_chat_template(
            _instruct_messages(json.loads(alpaca_file.read_text())[0]), return_dict=False
        )
        == ds[0]["tokens"]
    )

    for bad in ("../x.json", "/abs.json"):
        with pytest.raises(ValueError, match="relative path inside it"):
            ckpt.set_model_folder_files({bad: "{}"})
    with pytest.raises(FileNotFoundError, match="missing.model"):
        ckpt.set_model_folder_files({"tokenizer.model": tmp_path / "missing.model"})
