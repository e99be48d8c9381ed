# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest

from tests.test_utils import train_sentencepiece


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
