# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Helpers the chat tokenizers and the chat datasets share."""

from typing import List, Tuple


def truncate_chat(
    tokens: List[int], mask: List[bool], max_seq_len: int
) -> Tuple[List[int], List[bool]]:
    """Cut a tokenized conversation to ``max_seq_len`` without half-learning a turn.

    ``mask`` is True where a token is not trained on. If the cut falls inside a scored run (mask
    False on both sides of the cut), the kept part of that run is masked too: the turn lost its
    stop token, and training on its beginning alone would teach the model to never stop.

    Args:
        tokens (List[int]): token ids, length ``n``.
        mask (List[bool]): length ``n``; True where the token is not trained on.
        max_seq_len (int): the most tokens to keep, >= 1.

    Returns:
        Tuple[List[int], List[bool]]: the first ``min(n, max_seq_len)`` tokens and their mask
        (new lists; the inputs are not modified).

    Raises:
        ValueError: if the lengths differ or ``max_seq_len`` is not a positive int.
    """
    if len(tokens) != len(mask):
        raise ValueError(f"tokens and mask differ in length: {len(tokens)} != {len(mask)}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    kept_tokens, kept_mask = list(tokens[:max_seq_len]), list(mask[:max_seq_len])
    if len(tokens) > max_seq_len and not mask[max_seq_len] and not mask[max_seq_len - 1]:
        i = max_seq_len - 1
        while i >= 0 and not kept_mask[i]:
            kept_mask[i] = True
            i -= 1
    return kept_tokens, kept_mask
