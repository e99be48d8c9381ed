# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest
import torch

from torchtune.data import padded_collate


def test_pads_to_longest():
    batch = [
        {"tokens": [5, 6, 7], "labels": [-100, 6, 7]},
        {"tokens": [8], "labels": [8]},
        {"tokens": torch.tensor([1, 2, 3, 4, 9]), "labels": torch.tensor([1, 2, 3, 4, 9])},
    ]
    out = padded_collate(batch, padding_idx=3, ignore_idx=-1)
    assert set(out) == {"tokens", "labels"}
    assert out["tokens"].dtype == out["labels"].dtype == torch.long
    assert out["tokens"].tolist() == [[5, 6, 7, 3, 3], [8, 3, 3, 3, 3], [1, 2, 3, 4, 9]]
    assert out["labels"].tolist() == [[-100, 6, 7, -1, -1], [8, -1, -1, -1, -1], [1, 2, 3, 4, 9]]


def test_defaults_pad_with_zero_and_minus_100():
    out = padded_collate([{"tokens": [4, 4], "labels": [4, 4]}, {"tokens": [5], "labels": [5]}])
    assert out["tokens"].tolist() == [[4, 4], [5, 0]]
    assert out["labels"].tolist() == [[4, 4], [5, -100]]


def test_packed_samples():
    mask_a = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    mask_b = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    batch = [
        {"tokens": [1, 2, 3], "labels": [-100, 2, -100], "input_pos": [0, 1, 0], "mask": mask_a},
        {"tokens": [4, 5], "labels": [-100, 5], "input_pos": [0, 1], "mask": mask_b},
    ]
    out = padded_collate(batch)
    assert out["input_pos"].tolist() == [[0, 1, 0], [0, 1, 2]]
    assert out["mask"].shape == (2, 3, 3) and out["mask"].dtype == torch.bool
    assert torch.equal(out["mask"][0], mask_a)
    # The padded position attends only to itself.
    assert out["mask"][1].tolist() == [
        [True, False, False],
        [True, True, False],
        [False, False, True],
    ]
    assert out["labels"].tolist() == [[-100, 2, -100], [-100, 5, -100]]


def test_errors():
    with pytest.raises(ValueError, match="empty batch"):
        padded_collate([])
    with pytest.raises(ValueError, match="mix of packed"):
        padded_collate(
            [
                {"tokens": [1], "labels": [1], "mask": torch.ones(1, 1, dtype=torch.bool)},
                {"tokens": [1], "labels": [1]},
            ]
        )
    with pytest.raises(ValueError, match="sample 1 of the batch"):
        padded_collate([{"tokens": [1], "labels": [1]}, {"tokens": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="does not match 2 tokens"):
        padded_collate(
            [{"tokens": [1, 2], "labels": [1, 2], "mask": torch.ones(3, 3, dtype=torch.bool)}]
        )
