# Copyright (c) torchtune contributors. BSD-3-Clause license.
from pathlib import Path
from typing import List

import pytest

from tests.test_utils import sample_corpus, train_sentencepiece

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    # Identity normalization, as in Llama2's tokenizer.model, so decoded text shows "\n" exactly.
    return train_sentencepiece(
        tmp_path_factory.mktemp("sp") / "m", normalization_rule_name="identity"
    )


@pytest.fixture
def hf_cache(tmp_path):
    # Keep datasets' Arrow cache out of ~/.cache and independent between tests.
    return str(tmp_path / "hf_cache")


class AutoTokenizerAdapter:
    """The torchtune tokenizer surface around ``transformers.AutoTokenizer`` on a local folder.

    Shaped like a Llama 3 ``tokenizer.json``: byte-level BPE, BOS and EOS special tokens and no
    padding token (``pad_id`` None). Test-local; the library's own adapter is another task's.
    """

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        self.bos_id: int = self._tok.convert_tokens_to_ids(BOS)
        self.eos_id: int = self._tok.convert_tokens_to_ids(EOS)
        self.pad_id = None
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: List[int]) -> str:
        # No clean-up: it would turn " ." into "." and break the exact round trip.
        return self._tok.decode(
            [int(i) for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


def _alpaca_like_text() -> List[str]:
    # Template text and short answers, so the BPE learns merges such as "Response" and "\n\n".
    from torchtune.data import AlpacaInstructTemplate

    rows = [{"instruction": line, "input": ""} for line in sample_corpus(n_lines=50, seed=1)]
    rows += [
        {"instruction": "Add the two numbers.", "input": f"{i} and {2 * i}"} for i in range(50)
    ]
    return [AlpacaInstructTemplate.format(r) + str(i) for i, r in enumerate(rows)]


@pytest.fixture(scope="session")
def byte_bpe_dir(tmp_path_factory):
    """A byte-level BPE ``tokenizer.json`` (GPT-2 / Llama 3 style), trained here: no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(sample_corpus() + _alpaca_like_text(), trainer)
    path = tmp_path_factory.mktemp("byte_bpe")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS).save_pretrained(
        str(path)
    )
    return path


@pytest.fixture(scope="session")
def byte_bpe(byte_bpe_dir):
    return AutoTokenizerAdapter(byte_bpe_dir)


@pytest.fixture(scope="session")
def byte_bpe_reference(byte_bpe_dir):
    """``encode`` straight from the ``tokenizers`` library on the saved ``tokenizer.json``."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(byte_bpe_dir / "tokenizer.json"))
    bos, eos = tk.token_to_id(BOS), tk.token_to_id(EOS)

    def encode(text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        return [bos] * add_bos + tk.encode(text, add_special_tokens=False).ids + [eos] * add_eos

    return encode
