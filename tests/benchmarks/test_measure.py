# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest
import torch

from benchmarks import _measure as M
from benchmarks._sides import SHAPES, make_batches, non_embedding_params
from benchmarks.alpaca_like_data import AlpacaLikeDataset
from torchtune.datasets._packed import PackedDataset
from torchtune.models.llama2 import llama2


@pytest.mark.parametrize("shape", ["tiny", "small"])
def test_non_embedding_params_counts_the_model(shape):
    with torch.device("meta"):
        model = llama2(**SHAPES[shape], max_seq_len=64)
    expected = sum(p.numel() for n, p in model.named_parameters() if n != "tok_embeddings.weight")
    assert non_embedding_params(shape) == expected


def test_mfu_arithmetic():
    # 6N FLOPs per token for full fine-tuning, 4N for LoRA (no frozen weight gradients).
    assert M.model_flops_per_token(1000, "full") == 6000
    assert M.model_flops_per_token(1000, "lora") == 4000
    assert M.model_flops_per_token(1000, "qlora") == 4000  # frozen NF4 base: as LoRA
    n, tok_s, peak = 2_000_000, 300.0, 1e10
    assert M.mfu(tok_s, n, "full", peak) == pytest.approx(6 * n * tok_s / peak)
    assert M.mfu(tok_s, n, "lora", peak) == pytest.approx(4 * n * tok_s / peak)
    with pytest.raises(ValueError, match="method"):
        M.mfu(1.0, n, "prefix_tuning", peak)
    with pytest.raises(ValueError, match="peak"):
        M.mfu(1.0, n, "full", 0.0)


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_windows_pack_into_exact_rows(rows):
    ds = AlpacaLikeDataset(200, vocab_size=50, max_seq_len=512, seed=0)
    windows = M.packed_windows(ds.lengths, 512, rows)
    assert len(windows) >= 3
    assert windows[0][0] == 0
    for (_, b), (c, _) in zip(windows, windows[1:]):
        assert b == c  # contiguous: no sample skipped between windows
    for a, b in windows:
        assert len(PackedDataset([ds[i] for i in range(a, b)], max_seq_len=512)) == rows


@pytest.mark.parametrize("data", ["packed", "grouped", "padded"])
def test_both_sides_see_the_same_tokens(data):
    ds = AlpacaLikeDataset(60, vocab_size=50, max_seq_len=128, seed=2)
    ((a, b),) = M.packed_windows(ds.lengths, 128, 8)[:1]
    window = [ds[i] for i in range(a, b)]
    ours = make_batches(window, data, 4, 128)
    ref = make_batches(window, "hf", 4, 128)

    def real_tokens(batches):
        return [t for bt in batches for row in bt["tokens"].tolist() for t in row if t != 0]

    want = [t for s in window for t in s["tokens"]]
    assert sorted(real_tokens(ours)) == sorted(want)
    assert real_tokens(ref) == want  # in order, padding only at the ends of rows
    for bt in ref:
        assert torch.equal(bt["attention_mask"].bool(), bt["tokens"] != 0)
        assert bt["tokens"].shape[0] <= 4
    if data == "packed":
        assert real_tokens(ours) == want and len(ours) == 2
        assert all(bt["tokens"].shape == (4, 128) for bt in ours)
