# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""truncate_chat on hand-made cases (T = masked, F = scored)."""

import pytest

from torchtune.modules.tokenizers import truncate_chat

T, F = True, False


@pytest.mark.parametrize(
    "mask, max_seq_len, expected",
    [
        # Shorter than the limit, or cut exactly at its end: unchanged.
        ([T, F, F], 5, [T, F, F]),
        ([T, F, F], 3, [T, F, F]),
        # Cut inside a scored run: the kept part of that run is masked too.
        ([T, T, F, F, F, T], 4, [T, T, T, T]),
        ([F, F, F, F], 2, [T, T]),
        # Only the run that is cut: an earlier complete run stays scored.
        ([T, F, F, T, T, F, F, F], 7, [T, F, F, T, T, T, T]),
        # Cut right after a run ends (next token masked) or before it starts: unchanged.
        ([T, F, F, T, F], 3, [T, F, F]),
        ([T, T, F, F], 2, [T, T]),
        # Cut right at a run's first token: that single kept token is masked.
        ([T, F, F], 2, [T, T]),
        ([], 3, []),
    ],
)
def test_truncate_chat(mask, max_seq_len, expected):
    tokens = list(range(10, 10 + len(mask)))
    before = list(mask)
    out_tokens, out_mask = truncate_chat(tokens, mask, max_seq_len)
    assert out_tokens == tokens[:max_seq_len]
    assert out_mask == expected
    assert mask == before  # inputs are not modified


def test_truncate_chat_errors():
    with pytest.raises(ValueError, match="3 != 2"):
        truncate_chat([1, 2, 3], [T, F], 2)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_seq_len"):
            truncate_chat([1], [T], bad)
