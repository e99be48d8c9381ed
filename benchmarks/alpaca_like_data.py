# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Synthetic samples whose lengths follow Alpaca's, so benchmarks need no download.

Alpaca (52k instructions) rendered with its prompt template and the Llama2 tokenizer has a
median of about 180 tokens, a mean near 200 and a thin tail past 600 (under 1% of samples).
A log-normal with median 180 and sigma 0.55, floored at the ~40-token template, has the same
shape: P(len > 600) is about 1.4%, and after truncation at 512 about 1.4% of samples are cut.
What matters for speed is this length mix: how much padding a batch of 4 carries, and how
well samples pack into rows. Token ids are random; every sample is ``[bos, ..., eos]``.

Everything is deterministic in ``seed`` (Python's ``random`` for lengths, a seeded
``torch.Generator`` for ids), so the benchmark's two sides and repeated runs see the same data.
"""

import math
import random
from typing import Dict, List

import torch
from torch.utils.data import Dataset

MEDIAN_TOKENS = 180
SIGMA = 0.55
MIN_TOKENS = 40  # the Alpaca prompt template alone
BOS_ID, EOS_ID = 1, 2
FIRST_ID = 3  # ids 0-2 are pad/unk, bos, eos


def sample_lengths(num_samples: int, seed: int = 0) -> List[int]:
    """Untruncated token lengths of ``num_samples`` Alpaca-like samples.

    Args:
        num_samples: how many lengths.
        seed: the same seed gives the same lengths.

    Returns:
        ``num_samples`` ints ``>= MIN_TOKENS``.

    Raises:
        ValueError: if ``num_samples`` is negative.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = random.Random(seed)
    mu = math.log(MEDIAN_TOKENS)
    return [max(MIN_TOKENS, round(rng.lognormvariate(mu, SIGMA))) for _ in range(num_samples)]


class AlpacaLikeDataset(Dataset):
    """Map-style dataset of ``{"tokens", "labels"}`` samples, like ``alpaca_dataset`` gives.

    Samples longer than ``max_seq_len`` are truncated to it (as ``alpaca_dataset`` does).
    ``labels`` equal ``tokens`` (``train_on_input=True``, the default of our configs).

    Args:
        num_samples: dataset size.
        vocab_size: ids are drawn from ``[3, vocab_size)``.
        max_seq_len: truncation length.
        seed: the same seed gives the same samples.

    Raises:
        ValueError: if ``vocab_size <= 3`` or ``max_seq_len < 2``.
    """

    def __init__(self, num_samples: int, vocab_size: int, max_seq_len: int = 512, seed: int = 0):
        if vocab_size <= FIRST_ID:
            raise ValueError(f"vocab_size must be > {FIRST_ID}, got {vocab_size}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.lengths = [min(n, max_seq_len) for n in sample_lengths(num_samples, seed)]
        gen = torch.Generator().manual_seed(seed)
        self._samples: List[List[int]] = []
        for n in self.lengths:
            body = torch.randint(FIRST_ID, vocab_size, (n - 2,), generator=gen).tolist()
            self._samples.append([BOS_ID, *body, EOS_ID])

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        tokens = self._samples[index]
        return {"tokens": list(tokens), "labels": list(tokens)}
