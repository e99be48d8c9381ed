# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Packing: exact layout on hand-made samples, and packed vs unpacked per-token losses of a model."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_utils import write_alpaca_json
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate, padding_id
from torchtune.datasets import PackedDataset, alpaca_dataset
from torchtune.datasets._packed import pack_plan
from torchtune.models.llama2 import llama2
from torchtune.modules.tokenizers import SentencePieceTokenizer


def _sample(first, n):
    tokens = list(range(first, first + n))
    return {"tokens": tokens, "labels": [t + 1000 for t in tokens]}


def test_greedy_layout():
    # Lengths 3, 4, 2, 5, 8 into rows of 6: [3 + pad 3], [4, 2], [5 + pad 1], [8 cut to 6].
    samples = [_sample(10, 3), _sample(20, 4), _sample(30, 2), _sample(40, 5), _sample(50, 8)]
    ds = PackedDataset(samples, max_seq_len=6, padding_idx=7, strategy="greedy")
    assert len(ds) == 4
    expected = [
        ([10, 11, 12, 7, 7, 7], [-100, 1011, 1012, -100, -100, -100], [0, 1, 2, 0, 1, 2], [3, 3]),
        (
            [20, 21, 22, 23, 30, 31],
            [-100, 1021, 1022, 1023, -100, 1031],
            [0, 1, 2, 3, 0, 1],
            [4, 2],
        ),
        ([40, 41, 42, 43, 44, 7], [-100, 1041, 1042, 1043, 1044, -100], [0, 1, 2, 3, 4, 0], [5, 1]),
        ([50, 51, 52, 53, 54, 55], [-100, 1051, 1052, 1053, 1054, 1055], [0, 1, 2, 3, 4, 5], [6]),
    ]
    for row, (tokens, labels, input_pos, seq_lens) in zip(ds, expected):
        assert row["tokens"] == tokens
        assert row["labels"] == labels
        assert row["input_pos"] == input_pos
        # The documents' lengths, padding tail included; no [s, s] mask.
        assert row["seq_lens"] == seq_lens
        assert set(row) == {"tokens", "labels", "input_pos", "seq_lens"}


def test_best_fit_layout():
    # Lengths 2, 5, 3, 1, 4, 3 into rows of 6. Longest first: 5 -> A, 4 -> B, 3 -> C, 3 -> C,
    # 2 -> B (room 2, the best fit), 1 -> A. Greedy would need 5 rows ([2], [5], [3, 1], [4], [3]).
    samples = [
        _sample(10, 2),
        _sample(20, 5),
        _sample(30, 3),
        _sample(40, 1),
        _sample(50, 4),
        _sample(60, 3),
    ]
    ds = PackedDataset(samples, max_seq_len=6, padding_idx=7)
    assert pack_plan([2, 5, 3, 1, 4, 3], 6) == [[0, 4], [1, 3], [2, 5]]  # rows by first index
    assert len(PackedDataset(samples, max_seq_len=6, strategy="greedy")) == 5
    expected = [
        (
            [10, 11, 50, 51, 52, 53],
            [-100, 1011, -100, 1051, 1052, 1053],
            [0, 1, 0, 1, 2, 3],
            [2, 4],
        ),
        (
            [20, 21, 22, 23, 24, 40],
            [-100, 1021, 1022, 1023, 1024, -100],
            [0, 1, 2, 3, 4, 0],
            [5, 1],
        ),
        (
            [30, 31, 32, 60, 61, 62],
            [-100, 1031, 1032, -100, 1061, 1062],
            [0, 1, 2, 0, 1, 2],
            [3, 3],
        ),
    ]
    assert len(ds) == 3
    for row, (tokens, labels, input_pos, seq_lens) in zip(ds, expected):
        assert row["tokens"] == tokens
        assert row["labels"] == labels
        assert row["input_pos"] == input_pos
        assert row["seq_lens"] == seq_lens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_packs_every_sample_once_and_fills_rows(seed):
    g = torch.Generator().manual_seed(seed)
    # Alpaca-like: log-normal lengths around 180 tokens, a few over the row length.
    lengths = (torch.randn(3000, generator=g) * 0.55 + math.log(180)).exp().round().long()
    lengths = lengths.clamp(min=1).tolist()
    max_seq_len = 512
    rows = pack_plan(lengths, max_seq_len)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))  # every sample exactly once
    sizes = [sum(min(lengths[i], max_seq_len) for i in row) for row in rows]
    assert max(sizes) <= max_seq_len
    assert all(row == sorted(row) for row in rows) and [r[0] for r in rows] == sorted(
        r[0] for r in rows
    )
    # Lower bound on rows: total tokens / row length. Best fit lands within 2% of it; greedy
    # (in order) needs about a third more rows.
    bound = math.ceil(sum(sizes) / max_seq_len)
    assert len(rows) <= 1.02 * bound
    assert len(pack_plan(lengths, max_seq_len, "greedy")) > 1.2 * bound
    for i in range(len(lengths)):
        if lengths[i] >= max_seq_len:
            assert [i] in rows  # truncated long samples fill a row alone
    assert pack_plan(lengths, max_seq_len) == rows  # deterministic


def test_packed_errors():
    with pytest.raises(ValueError, match="max_seq_len"):
        PackedDataset([_sample(1, 2)], max_seq_len=0)
    with pytest.raises(ValueError, match="sample 1: 2 tokens but 1 labels"):
        PackedDataset([_sample(1, 2), {"tokens": [1, 2], "labels": [1]}], max_seq_len=4)
    with pytest.raises(ValueError, match="strategy.*'first_fit'"):
        PackedDataset([_sample(1, 2)], max_seq_len=4, strategy="first_fit")
    with pytest.raises(ValueError, match="strategy"):
        pack_plan([1], 4, strategy="")


def _per_token_losses(model, batch):
    logits = model(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
    assert torch.isfinite(logits).all()  # padding documents included
    # [b, s-1]: logits at t predict the label at t + 1; ignored labels give 0.
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2),
        batch["labels"][:, 1:],
        ignore_index=CROSS_ENTROPY_IGNORE_IDX,
        reduction="none",
    )


@pytest.mark.parametrize("strategy", ["best_fit", "greedy"])
def test_packed_losses_match_unpacked(sp_model_path, tmp_path, strategy):
    # train_on_input=True so every position's loss is compared (masking is tested elsewhere).
    tok = SentencePieceTokenizer(sp_model_path)
    path = write_alpaca_json(tmp_path / "a.json", n=6)
    max_seq_len = 384
    kwargs = dict(
        source="json", data_files=str(path), cache_dir=str(tmp_path / "c"), train_on_input=True
    )
    unpacked = alpaca_dataset(tok, max_seq_len=max_seq_len, **kwargs)
    lens = [len(unpacked[i]["tokens"]) for i in range(len(unpacked))]
    packed = PackedDataset(
        unpacked, max_seq_len=max_seq_len, padding_idx=tok.pad_id, strategy=strategy
    )
    if strategy == "best_fit":  # what packed=True builds
        packed_default = alpaca_dataset(tok, max_seq_len=max_seq_len, packed=True, **kwargs)
        assert [r["tokens"] for r in packed_default] == [r["tokens"] for r in packed]
    assert max(lens) < max_seq_len and len(packed) < len(
        unpacked
    )  # rows really hold several samples

    torch.manual_seed(0)
    model = llama2(
        vocab_size=tok.vocab_size,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=max_seq_len,
        intermediate_dim=88,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        ref = _per_token_losses(
            model, padded_collate([unpacked[i] for i in range(len(unpacked))], tok.pad_id)
        )
        packed_batch = padded_collate([packed[i] for i in range(len(packed))], tok.pad_id)
        got = _per_token_losses(model, packed_batch)
        no_mask = _per_token_losses(
            model, {"tokens": packed_batch["tokens"], "labels": packed_batch["labels"]}
        )

    # Walk the packs: each sample's losses sit at its offset in its row.
    plan = pack_plan(lens, max_seq_len, strategy)
    assert len(plan) == len(packed)
    n_compared = 0
    for r, row in enumerate(plan):
        off = 0
        for i in row:
            n = lens[i]
            torch.testing.assert_close(
                got[r, off : off + n - 1], ref[i, : n - 1], atol=1e-5, rtol=0
            )
            if off > 0:
                # The prediction across the boundary is ignored, not trained on.
                assert got[r, off - 1] == 0
                assert not torch.allclose(no_mask[r, off : off + n - 1], ref[i, : n - 1], atol=1e-3)
            off += n
            n_compared += 1
        assert (got[r, off:] == 0).all()  # padding adds no loss
    assert n_compared == len(lens)
    # Hence the batch mean loss is the same too.
    n_tokens = (packed_batch["labels"] != -100).sum()
    assert n_tokens == sum(
        (torch.tensor(unpacked[k]["labels"][1:]) != -100).sum() for k in range(len(lens))
    )
    torch.testing.assert_close(got.sum() / n_tokens, ref.sum() / n_tokens, atol=1e-6, rtol=0)


def test_the_padding_id_does_not_change_any_scored_loss(byte_bpe, tmp_path):
    # padding_id falls back to EOS for a tokenizer without a pad token: any in-vocabulary id
    # must do, since padding is unscored and a document of its own. Same rows padded with EOS
    # and with another id give the same losses wherever a label is scored.
    path = write_alpaca_json(tmp_path / "a.json", n=6)
    kwargs = dict(source="json", data_files=str(path), cache_dir=str(tmp_path / "c"))
    unpacked = alpaca_dataset(byte_bpe, max_seq_len=192, **kwargs)
    packed = alpaca_dataset(byte_bpe, max_seq_len=192, packed=True, **kwargs)
    batch = padded_collate([packed[i] for i in range(len(packed))], padding_id(byte_bpe))
    is_pad = torch.ones_like(batch["tokens"], dtype=torch.bool)
    for r, row in enumerate(pack_plan([len(s["tokens"]) for s in unpacked], 192)):
        is_pad[r, : sum(len(unpacked[i]["tokens"]) for i in row)] = False
    assert (batch["tokens"][is_pad] == byte_bpe.eos_id).all()
    other = dict(batch, tokens=batch["tokens"].masked_fill(is_pad, 5))
    torch.manual_seed(0)
    model = llama2(
        vocab_size=byte_bpe.vocab_size,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=192,
        intermediate_dim=88,
    ).eval()
    with torch.no_grad():
        got, ref = _per_token_losses(model, batch), _per_token_losses(model, other)
    scored = batch["labels"][:, 1:] != CROSS_ENTROPY_IGNORE_IDX
    assert is_pad.sum() > 0 and scored.sum() > 0
    assert not (is_pad[:, 1:] & scored).any()
    torch.testing.assert_close(got[scored], ref[scored], atol=0, rtol=0)


def test_packed_labels_use_the_one_ignore_value(monkeypatch):
    # Sample boundaries and padding get torchtune.data.CROSS_ENTROPY_IGNORE_IDX, not a literal.
    from torchtune.datasets import _packed

    monkeypatch.setattr(_packed, "CROSS_ENTROPY_IGNORE_IDX", -7)
    ds = PackedDataset([_sample(10, 3), _sample(20, 2)], max_seq_len=6, strategy="greedy")
    assert ds[0]["labels"] == [-7, 1011, 1012, -7, 1021, -7]
    assert ds[0]["seq_lens"] == [3, 2, 1]
