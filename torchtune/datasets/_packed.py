# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pack variable-length samples into fixed-length rows."""
import logging
from typing import Any, Dict, List, Union

import torch
from torch.utils.data import Dataset

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

logger = logging.getLogger(__name__)


class PackedDataset(Dataset):
    """Greedily concatenate the samples of ``ds`` into rows of exactly ``max_seq_len`` tokens.

    Samples are taken in order; a sample that does not fit in what is left of the current
    row starts a new row, and the leftover of the closed row is padding (tokens ``padding_idx``,
    labels -100). Samples longer than ``max_seq_len`` are truncated to it.

    Each row yields:
        - ``tokens``, ``labels`` (List[int], length ``max_seq_len``): the first label of every
          packed sample is -100, because with the usual shift it would be predicted from the
          previous sample's last token.
        - ``input_pos`` (List[int]): positions restarting at 0 for every sample. The padding tail
          is treated as one more segment, so its positions also start at 0.
        - ``mask`` (BoolTensor[max_seq_len, max_seq_len]): block-causal, True = may attend; a token
          sees only the earlier tokens of its own sample. Padding attends causally within the
          padding block, so no row of the mask is all False (which would make SDPA return NaN).

    With this mask and these positions, a model gives every packed sample the same logits as
    when the sample is run alone, so per-token losses match the unpacked data.

    The whole dataset is tokenized once here (packing needs every length); masks are built
    on the fly in ``__getitem__`` rather than stored (they are quadratic in ``max_seq_len``).

    Args:
        ds (Dataset): a map-style dataset of ``{"tokens", "labels"}`` samples.
        max_seq_len (int): length of every packed row.
        padding_idx (int): token id for padding. Default 0.

    Raises:
        ValueError: if ``max_seq_len`` is not positive, or a sample's tokens and labels differ in length.
    """

    def __init__(self, ds: Dataset, max_seq_len: int, padding_idx: int = 0):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.padding_idx = padding_idx
        self._packs: List[Dict[str, torch.Tensor]] = []
        tokens: List[int] = []
        labels: List[int] = []
        seq_lens: List[int] = []
        num_truncated = 0
        for i in range(len(ds)):
            sample = ds[i]
            t, l = list(sample["tokens"]), list(sample["labels"])
            if len(t) != len(l):
                raise ValueError(f"sample {i}: {len(t)} tokens but {len(l)} labels")
            if not t:
                continue
            if len(t) > max_seq_len:
                t, l = t[:max_seq_len], l[:max_seq_len]
                num_truncated += 1
            if len(tokens) + len(t) > max_seq_len:
                self._close(tokens, labels, seq_lens)
                tokens, labels, seq_lens = [], [], []
            tokens += t
            labels += [CROSS_ENTROPY_IGNORE_IDX] + l[1:]
            seq_lens.append(len(t))
        if tokens:
            self._close(tokens, labels, seq_lens)
        if num_truncated:
            logger.warning(
                "PackedDataset: truncated %d samples longer than %d tokens", num_truncated, max_seq_len
            )
        logger.info(
            "PackedDataset: packed %d samples into %d rows of %d tokens",
            len(ds), len(self._packs), max_seq_len,
        )

    def _close(self, tokens: List[int], labels: List[int], seq_lens: List[int]) -> None:
        pad = self.max_seq_len - len(tokens)
        if pad:
            tokens = tokens + [self.padding_idx] * pad
            labels = labels + [CROSS_ENTROPY_IGNORE_IDX] * pad
            seq_lens = seq_lens + [pad]
        # int32 tensors, not Python lists: a list costs ~36 bytes per token, which adds up to
        # gigabytes on a full dataset.
        self._packs.append(
            {
                "tokens": torch.tensor(tokens, dtype=torch.int32),
                "labels": torch.tensor(labels, dtype=torch.int32),
                "seq_lens": torch.tensor(seq_lens),
            }
        )

    def __len__(self) -> int:
        return len(self._packs)

    def __getitem__(self, index: int) -> Dict[str, Union[List[int], torch.Tensor]]:
        pack = self._packs[index]
        seq_lens = pack["seq_lens"]
        segment = torch.repeat_interleave(torch.arange(len(seq_lens)), seq_lens)  # [s]
        starts = torch.repeat_interleave(seq_lens.cumsum(0) - seq_lens, seq_lens)  # [s]
        input_pos = torch.arange(self.max_seq_len) - starts
        causal = torch.ones(self.max_seq_len, self.max_seq_len, dtype=torch.bool).tril()
        mask = (segment[:, None] == segment[None, :]) & causal  # [s, s]
        return {
            "tokens": pack["tokens"].tolist(),
            "labels": pack["labels"].tolist(),
            "input_pos": input_pos.tolist(),
            "mask": mask,
        }
