# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Packing: exact layout on hand-made samples, and packed vs unpacked per-token losses of a model."""
import pytest
import torch
import torch.nn.functional as F

from tests.test_utils import write_alpaca_json
from torchtune.data import padded_collate
from torchtune.datasets import PackedDataset, alpaca_dataset
from torchtune.models.llama2 import llama2
from torchtune.modules.tokenizers import SentencePieceTokenizer


def _sample(first, n):
    tokens = list(range(first, first + n))
    return {"tokens": tokens, "labels": [t + 1000 for t in tokens]}


def _expected_mask(seq_lens):
    seg = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    i = torch.arange(len(seg))
    return (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])


def test_greedy_layout():
    # Lengths 3, 4, 2, 5, 8 into rows of 6: [3 + pad 3], [4, 2], [5 + pad 1], [8 cut to 6].
    samples = [_sample(10, 3), _sample(20, 4), _sample(30, 2), _sample(40, 5), _sample(50, 8)]
    ds = PackedDataset(samples, max_seq_len=6, padding_idx=7)
    assert len(ds) == 4
    expected = [
        ([10, 11, 12, 7, 7, 7], [-100, 1011, 1012, -100, -100, -100], [0, 1, 2, 0, 1, 2], [3, 3]),
        ([20, 21, 22, 23, 30, 31], [-100, 1021, 1022, 1023, -100, 1031], [0, 1, 2, 3, 0, 1], [4, 2]),
        ([40, 41, 42, 43, 44, 7], [-100, 1041, 1042, 1043, 1044, -100], [0, 1, 2, 3, 4, 0], [5, 1]),
        ([50, 51, 52, 53, 54, 55], [-100, 1051, 1052, 1053, 1054, 1055], [0, 1, 2, 3, 4, 5], [6]),
    ]
    for row, (tokens, labels, input_pos, seq_lens) in zip(ds, expected):
        assert row["tokens"] == tokens
        assert row["labels"] == labels
        assert row["input_pos"] == input_pos
        assert row["mask"].dtype == torch.bool
        assert torch.equal(row["mask"], _expected_mask(seq_lens))
        assert row["mask"].any(dim=-1).all()  # no all-False row: SDPA would give NaN


def test_packed_errors():
    with pytest.raises(ValueError, match="max_seq_len"):
        PackedDataset([_sample(1, 2)], max_seq_len=0)
    with pytest.raises(ValueError, match="sample 1: 2 tokens but 1 labels"):
        PackedDataset([_sample(1, 2), {"tokens": [1, 2], "labels": [1]}], max_seq_len=4)


def _per_token_losses(model, batch):
    logits = model(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
    assert torch.isfinite(logits).all()  # padding rows of the mask included
    # [b, s-1]: logits at t predict the label at t + 1; ignored labels give 0.
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none"
    )


def test_packed_losses_match_unpacked(sp_model_path, tmp_path):
    # train_on_input=True so every position's loss is compared (masking is tested elsewhere).
    tok = SentencePieceTokenizer(sp_model_path)
    path = write_alpaca_json(tmp_path / "a.json", n=6)
    max_seq_len = 384
    kwargs = dict(source="json", data_files=str(path), cache_dir=str(tmp_path / "c"), train_on_input=True)
    unpacked = alpaca_dataset(tok, max_seq_len=max_seq_len, **kwargs)
    packed = alpaca_dataset(tok, max_seq_len=max_seq_len, packed=True, **kwargs)
    lens = [len(unpacked[i]["tokens"]) for i in range(len(unpacked))]
    assert max(lens) < max_seq_len and len(packed) < len(unpacked)  # rows really hold several samples

    torch.manual_seed(0)
    model = llama2(vocab_size=tok.vocab_size, num_layers=2, num_heads=4, num_kv_heads=2,
                   embed_dim=64, max_seq_len=max_seq_len, intermediate_dim=88).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        ref = _per_token_losses(model, padded_collate([unpacked[i] for i in range(len(unpacked))], tok.pad_id))
        packed_batch = padded_collate([packed[i] for i in range(len(packed))], tok.pad_id)
        got = _per_token_losses(model, packed_batch)
        no_mask = _per_token_losses(model, {"tokens": packed_batch["tokens"], "labels": packed_batch["labels"]})

    # Walk the packs in order: each sample's losses sit at its offset in its row.
    i, n_compared = 0, 0
    for r in range(len(packed)):
        off = 0
        while i < len(lens) and off + lens[i] <= max_seq_len:
            n = lens[i]
            torch.testing.assert_close(got[r, off:off + n - 1], ref[i, : n - 1], atol=1e-5, rtol=0)
            if off > 0:
                # The prediction across the boundary is ignored, not trained on.
                assert got[r, off - 1] == 0
                assert not torch.allclose(no_mask[r, off:off + n - 1], ref[i, : n - 1], atol=1e-3)
            off += n
            i += 1
            n_compared += 1
        assert (got[r, off:] == 0).all()  # padding adds no loss
    assert n_compared == len(lens)
    # Hence the batch mean loss is the same too.
    n_tokens = (packed_batch["labels"] != -100).sum()
    assert n_tokens == sum((torch.tensor(unpacked[k]["labels"][1:]) != -100).sum() for k in range(len(lens)))
    torch.testing.assert_close(got.sum() / n_tokens, ref.sum() / n_tokens, atol=1e-6, rtol=0)
