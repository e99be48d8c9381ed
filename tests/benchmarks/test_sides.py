# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The benchmark's two sides train the same model on the same tokens, with every lever on."""

import pytest
import torch

from benchmarks import _measure as M
from benchmarks._sides import (
    Levers,
    PlainCrossEntropy,
    build_hf,
    build_ours,
    dense_mask_attention,
    eager_attention,
    make_batches,
    make_weights,
)
from benchmarks.alpaca_like_data import AlpacaLikeDataset
from torchtune.training import ChunkedCrossEntropyLoss

CPU, F32 = torch.device("cpu"), torch.float32


def _window(max_seq_len=128, rows=4, seed=0):
    ds = AlpacaLikeDataset(40, vocab_size=1000, max_seq_len=max_seq_len, seed=seed)
    a, b = M.packed_windows(ds.lengths, max_seq_len, rows)[0]
    return [ds[i] for i in range(a, b)]


@pytest.mark.parametrize("shape", ["tiny", "tiny_llama3"])
@pytest.mark.parametrize("drop_unscored", [True, False])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_ours_matches_hf_step_by_step(method, drop_unscored, shape):
    # Same batches on both sides: the losses agree before and after an AdamW step, so the
    # weights, the adapter and the optimizer settings are the same on both sides; with or
    # without the padding cut off before our model runs. tiny_llama3: GQA + llama3 RoPE.
    weights, adapter = make_weights(shape, method, 0, "cpu", F32)
    window = _window()
    levers = Levers(data="padded", drop_unscored=drop_unscored)
    ours = build_ours(shape, method, levers, weights, adapter, CPU, F32)
    hf = build_hf(shape, method, weights, adapter, CPU, F32)
    for b_ours, b_hf in zip(
        make_batches(window, "padded", 4, 128), make_batches(window, "hf", 4, 128)
    ):
        torch.testing.assert_close(ours(b_ours), hf(b_hf), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_packed_step_scores_the_same_tokens_as_hf(method):
    # Every lever of our default on (packing, chunked CE, frozen LoRA weights, foreach AdamW,
    # SDPA): the first step's mean token loss over a packed window equals HF's over the same
    # samples padded (packing drops only the cross-sample predictions, which never exist
    # unpacked). qlora: our NF4 base and bitsandbytes' Linear4bit hold the same weights.
    weights, adapter = make_weights("tiny", method, 1, "cpu", F32)
    window = _window(rows=4)
    ours = build_ours("tiny", method, Levers(), weights, adapter, CPU, F32)
    hf = build_hf("tiny", method, weights, adapter, CPU, F32)
    (packed,) = make_batches(window, "packed", 4, 128)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in make_batches(window, "hf", 4, 128):
            out = hf.model(
                input_ids=b["tokens"], attention_mask=b["attention_mask"], labels=b["labels"]
            )
            n = int((b["labels"][:, 1:] != -100).sum())
            total, count = total + float(out.loss) * n, count + n
    torch.testing.assert_close(ours(packed), total / count, rtol=1e-5, atol=1e-5)


def test_plain_ce_equals_chunked_ce():
    torch.manual_seed(0)
    logits = torch.randn(3, 37, 101, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 101, (3, 37))
    labels[0, :5] = -100
    plain_sum, plain_n = PlainCrossEntropy()(logits, labels)
    (g_plain,) = torch.autograd.grad(plain_sum, logits)
    chunk_sum, chunk_n = ChunkedCrossEntropyLoss(num_chunks=8)(logits, labels)
    (g_chunk,) = torch.autograd.grad(chunk_sum, logits)
    assert int(plain_n) == int(chunk_n) == 3 * 37 - 5
    torch.testing.assert_close(chunk_sum, plain_sum.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_chunk.double(), g_plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_eager_attention_equals_sdpa(packed):
    weights, _ = make_weights("tiny", "full", 0, "cpu", F32)
    step = build_ours("tiny", "full", Levers(), weights, None, CPU, F32)
    model = step.model
    (batch,) = make_batches(_window(rows=2), "packed" if packed else "padded", 4, 128)[:1]
    kwargs = {"mask": batch.get("mask"), "input_pos": batch.get("input_pos")}
    with torch.no_grad():
        want = model(batch["tokens"], **kwargs)
        with eager_attention():
            got = model(batch["tokens"], **kwargs)
        with dense_mask_attention():
            dense = model(batch["tokens"], **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)


def test_frozen_lever_off_gives_base_weights_gradients_only():
    weights, adapter = make_weights("tiny", "lora", 0, "cpu", F32)
    on = build_ours("tiny", "lora", Levers(), weights, adapter, CPU, F32)
    off = build_ours("tiny", "lora", Levers(frozen=False), weights, adapter, CPU, F32)
    assert all(p.requires_grad == ("lora_" in n) for n, p in on.model.named_parameters())
    assert all(p.requires_grad for p in off.model.parameters())
    (batch,) = make_batches(_window(rows=2), "packed", 2, 128)[:1]
    torch.testing.assert_close(on(batch), off(batch))  # only the adapters are optimized
