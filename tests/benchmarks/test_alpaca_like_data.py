# Copyright (c) torchtune contributors. BSD-3-Clause license.
import statistics

import pytest

from benchmarks.alpaca_like_data import (
    BOS_ID,
    EOS_ID,
    FIRST_ID,
    MIN_TOKENS,
    AlpacaLikeDataset,
    sample_lengths,
)


def test_lengths_follow_alpaca():
    lengths = sample_lengths(20_000, seed=0)
    # Alpaca with its template and the Llama2 tokenizer: median ~180, a thin tail past 600.
    assert 165 <= statistics.median(lengths) <= 195
    past_600 = sum(n > 600 for n in lengths) / len(lengths)
    assert 0.003 <= past_600 <= 0.03
    assert min(lengths) >= MIN_TOKENS
    assert max(lengths) > 700


def test_deterministic_in_seed():
    assert sample_lengths(50, seed=3) == sample_lengths(50, seed=3)
    assert sample_lengths(50, seed=3) != sample_lengths(50, seed=4)
    a, b = AlpacaLikeDataset(20, 97, seed=1), AlpacaLikeDataset(20, 97, seed=1)
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]


def test_samples_are_truncated_well_formed_sequences():
    ds = AlpacaLikeDataset(300, vocab_size=97, max_seq_len=256, seed=0)
    untruncated = sample_lengths(300, seed=0)
    assert any(n > 256 for n in untruncated)  # the truncation path is exercised
    for i, n in enumerate(untruncated):
        s = ds[i]
        assert len(s["tokens"]) == min(n, 256) == ds.lengths[i]
        assert s["labels"] == s["tokens"]
        assert s["tokens"][0] == BOS_ID and s["tokens"][-1] == EOS_ID
        assert all(FIRST_ID <= t < 97 for t in s["tokens"][1:-1])


@pytest.mark.parametrize("kwargs", [{"vocab_size": 3}, {"vocab_size": 50, "max_seq_len": 1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        AlpacaLikeDataset(4, **kwargs)
