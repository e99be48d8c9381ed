# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate
from torchtune.datasets import PackedDataset
from torchtune.modules import DocumentMask


def test_pads_to_longest():
    batch = [
        {"tokens": [5, 6, 7], "labels": [-100, 6, 7]},
        {"tokens": [8], "labels": [8]},
        {"tokens": torch.tensor([1, 2, 3, 4, 9]), "labels": torch.tensor([1, 2, 3, 4, 9])},
    ]
    out = padded_collate(batch, padding_idx=3)
    assert set(out) == {"tokens", "labels"}
    assert out["tokens"].dtype == out["labels"].dtype == torch.long
    assert out["tokens"].tolist() == [[5, 6, 7, 3, 3], [8, 3, 3, 3, 3], [1, 2, 3, 4, 9]]
    i = CROSS_ENTROPY_IGNORE_IDX
    assert out["labels"].tolist() == [[-100, 6, 7, i, i], [8, i, i, i, i], [1, 2, 3, 4, 9]]


def test_defaults_pad_with_zero_and_the_ignore_value():
    assert CROSS_ENTROPY_IGNORE_IDX == -100  # torch's cross-entropy default
    out = padded_collate([{"tokens": [4, 4], "labels": [4, 4]}, {"tokens": [5], "labels": [5]}])
    assert out["tokens"].tolist() == [[4, 4], [5, 0]]
    assert out["labels"].tolist() == [[4, 4], [5, -100]]


def test_ignore_value_is_not_an_argument():
    with pytest.raises(TypeError, match="ignore_idx"):
        padded_collate([{"tokens": [1], "labels": [1]}], ignore_idx=-1)


def _no_dense_masks(batch):
    return not any(isinstance(v, torch.Tensor) and v.dim() == 3 for v in batch.values())


def test_packed_samples_carry_their_document_lengths():
    # Row a: documents of 2 and 1 tokens; row b: one of 2 tokens, padded by collate to 3.
    batch = [
        {
            "tokens": [1, 2, 3],
            "labels": [-100, 2, -100],
            "input_pos": [0, 1, 0],
            "seq_lens": [2, 1],
        },
        {"tokens": [4, 5], "labels": [-100, 5], "input_pos": [0, 1], "seq_lens": [2]},
    ]
    out = padded_collate(batch)
    assert set(out) == {"tokens", "labels", "input_pos", "mask"}
    # Over the flattened 2 * 3 tokens: a's 2 and 1, b's 2, and b's padded column on its own.
    assert out["mask"] == DocumentMask((2, 1, 2, 1))
    # The padded column is a document: its position restarts at 0.
    assert out["input_pos"].tolist() == [[0, 1, 0], [0, 1, 0]]
    assert out["labels"].tolist() == [[-100, 2, -100], [-100, 5, -100]]
    assert _no_dense_masks(out)


def test_packed_dataset_rows_collate_to_their_exact_lengths():
    # Lengths 3, 4, 2 into rows of 6 (greedy): [3 + pad 3], [4, 2]; PackedDataset's padding
    # tail is a document of its own.
    samples = [{"tokens": list(range(n)), "labels": list(range(n))} for n in (3, 4, 2)]
    ds = PackedDataset(samples, max_seq_len=6, strategy="greedy")
    out = padded_collate([ds[0], ds[1]])
    assert out["mask"] == DocumentMask((3, 3, 4, 2))
    assert out["input_pos"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    assert _no_dense_masks(out)


def test_errors():
    with pytest.raises(ValueError, match="empty batch"):
        padded_collate([])
    packed = {"tokens": [1], "labels": [1], "input_pos": [0], "seq_lens": [1]}
    with pytest.raises(ValueError, match="mix of packed"):
        padded_collate([packed, {"tokens": [1], "labels": [1]}])
    with pytest.raises(ValueError, match="sample 1 of the batch"):
        padded_collate([{"tokens": [1], "labels": [1]}, {"tokens": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match=r"seq_lens \[1, 2\] must be positive and sum to its 2"):
        padded_collate([{**packed, "tokens": [1, 2], "labels": [1, 2], "seq_lens": [1, 2]}])
    with pytest.raises(ValueError, match=r"seq_lens \[2, 0\]"):
        padded_collate([{**packed, "tokens": [1, 2], "labels": [1, 2], "seq_lens": [2, 0]}])
    with pytest.raises(ValueError, match="without 'input_pos'"):
        padded_collate([{"tokens": [1], "labels": [1], "seq_lens": [1]}])
    with pytest.raises(ValueError, match="'mask'.*seq_lens"):
        padded_collate([{"tokens": [1], "labels": [1], "mask": torch.ones(1, 1, dtype=torch.bool)}])


def test_packed_batches_travel_through_dataloader_workers():
    # The DocumentMask is plain Python (lengths), so it pickles across worker processes and
    # pin_memory leaves it as it is.
    samples = [{"tokens": list(range(n)), "labels": list(range(n))} for n in (3, 4, 2, 5)]
    ds = PackedDataset(samples, max_seq_len=6, strategy="greedy")
    loader = DataLoader(ds, batch_size=2, collate_fn=padded_collate, num_workers=1)
    batches = list(loader)
    assert [b["mask"] for b in batches] == [
        padded_collate([ds[0], ds[1]])["mask"],
        padded_collate([ds[2]])["mask"],
    ]
    assert batches[0]["mask"] == DocumentMask((3, 3, 4, 2))
    assert pickle.loads(pickle.dumps(batches[0]["mask"])) == batches[0]["mask"]
