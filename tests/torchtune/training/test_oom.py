# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Out-of-memory recovery: splitting collated batches (padded, packed, pairs) against
collating the subsets, a retried step against the same step run with the smaller micro-batches,
freeing, exhaustion, and the CUDA allocator's environment."""

import copy
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

from tests.test_utils import tiny_hf_llama
from tests.torchtune.rlhf.test_logps_and_reference import VOCAB, _lora
from torchtune.data import padded_collate, padded_collate_pairs
from torchtune.datasets import PackedDataset
from torchtune.models.llama2 import llama2
from torchtune.modules.attention import DocumentMask
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.rlhf import DPOLoss, adapters_disabled, preference_step, sequence_logps
from torchtune.training import (
    ChunkedCrossEntropyLoss,
    OomRetry,
    configure_cuda_allocator,
    is_out_of_memory,
    optimizer_step,
    split_batch,
)

IGNORE = -100
PAD = 0
CPU = torch.device("cpu")
SHAPE = dict(
    vocab_size=61,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    intermediate_dim=44,
    max_seq_len=64,
)


def _samples(n, seed=0, lo=3, hi=17):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        n_prompt = int(torch.randint(0, length, (1,), generator=g))
        tokens = torch.randint(3, 61, (length,), generator=g).tolist()
        out.append({"tokens": tokens, "labels": [IGNORE] * n_prompt + tokens[n_prompt:]})
    return out


def _pair_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt = int(torch.randint(2, 6, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (n_prompt,), generator=g).tolist()
        sample = {}
        for side in ("chosen", "rejected"):
            answer = torch.randint(3, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),))
            sample[f"{side}_tokens"] = prompt + answer.tolist()
            sample[f"{side}_labels"] = [IGNORE] * n_prompt + answer.tolist()
        out.append(sample)
    return out


def _assert_same_batch(got, want):
    """``got`` may be wider than ``want``: its extra columns must be padding."""
    assert got.keys() == want.keys()
    width = want["tokens"].shape[1]
    for key, value in want.items():
        if isinstance(value, DocumentMask):
            assert got[key] == value, key
            continue
        torch.testing.assert_close(got[key][:, :width], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(
        got["labels"][:, width:], torch.full_like(got["labels"][:, width:], IGNORE)
    )
    torch.testing.assert_close(
        got["tokens"][:, width:], torch.full_like(got["tokens"][:, width:], PAD)
    )


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_split_padded_batch_is_collating_the_subsets(parts):
    samples = _samples(5)
    batch = padded_collate(samples, padding_idx=PAD)
    got = split_batch(batch, parts)
    sizes = [len(c) for c in torch.arange(5).tensor_split(parts)]
    assert [p["tokens"].shape[0] for p in got] == sizes
    start = 0
    for part, size in zip(got, sizes):
        _assert_same_batch(part, padded_collate(samples[start : start + size], padding_idx=PAD))
        start += size


@pytest.mark.parametrize("parts", [2, 3])
def test_split_packed_batch_keeps_each_rows_documents(parts):
    rows = list(PackedDataset(_samples(14, seed=1), max_seq_len=24, padding_idx=PAD))
    assert len(rows) >= 4 and any(len(r["seq_lens"]) > 2 for r in rows)
    rows = rows[:4]
    batch = padded_collate(rows, padding_idx=PAD)
    assert isinstance(batch["mask"], DocumentMask) and "input_pos" in batch
    start = 0
    for part in split_batch(batch, parts):
        n = part["tokens"].shape[0]
        _assert_same_batch(part, padded_collate(rows[start : start + n], padding_idx=PAD))
        start += n
    assert start == 4


def test_split_pair_batch_keeps_pairs_together():
    samples = _pair_samples(5)
    batch = padded_collate_pairs(samples, padding_idx=PAD)
    got = split_batch(batch, 2, paired=True)
    assert [p["tokens"].shape[0] for p in got] == [6, 4]  # 3 pairs, 2 pairs
    _assert_same_batch(got[0], padded_collate_pairs(samples[:3], padding_idx=PAD))
    _assert_same_batch(got[1], padded_collate_pairs(samples[3:], padding_idx=PAD))


def test_split_batch_refuses_what_it_cannot_split():
    batch = padded_collate(_samples(3), padding_idx=PAD)
    with pytest.raises(ValueError, match="3 samples into 4 parts"):
        split_batch(batch, 4)
    with pytest.raises(ValueError, match="batch key 'extra'"):
        split_batch({**batch, "extra": "x"}, 2)
    with pytest.raises(ValueError, match="batch key 'weights'"):
        split_batch({**batch, "weights": torch.ones(2)}, 2)
    s = batch["tokens"].shape[1]
    crossing = DocumentMask((s + 1, 2 * s - 1))
    with pytest.raises(ValueError, match="crosses a row end"):
        split_batch({**batch, "mask": crossing}, 3)
    with pytest.raises(ValueError, match="even number of rows"):
        split_batch(batch, 1, paired=True)


def _models(n, seed=0):
    torch.manual_seed(seed)
    first = llama2(**SHAPE)
    return [first] + [copy.deepcopy(first) for _ in range(n - 1)]


def _step(model, opt, micro, oom=None, loss_fn=None):
    return optimizer_step(
        model,
        loss_fn or ChunkedCrossEntropyLoss(num_chunks=2),
        opt,
        micro,
        params=model.parameters(),
        device=CPU,
        clip_grad_norm=0.5,
        oom=oom,
    )


def _assert_same_params(a, b, atol=1e-6):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=atol, msg=n)


def test_oom_at_a_step_continues_with_half_the_micro_batch(monkeypatch, caplog):
    """OOM at step 2 with batches of 4: steps 2 and 3 run as 2 micro-batches of 2 (which
    tensors the loss saw), and every loss and weight equals the uninterrupted run with those
    micro-batches."""
    monkeypatch.setenv("TUNE_TEST_OOM_AT_STEP", "2")
    ours, ref = _models(2)
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ours, ref))
    oom = OomRetry(CPU, max_oom_retries=3)
    seen = []

    class Recording(ChunkedCrossEntropyLoss):
        def forward(self, logits, labels):
            seen.append(labels.shape[1])
            return super().forward(logits, labels)

    batches = [padded_collate(_samples(4, seed=s), padding_idx=PAD) for s in range(3)]
    with caplog.at_level(logging.WARNING):
        for i, batch in enumerate(batches):
            seen.clear()
            loss, tokens = _step(ours, opt, [batch], oom, loss_fn=Recording(num_chunks=2))
            micro = [batch] if i == 0 else split_batch(batch, 2)
            ref_loss, ref_tokens = _step(ref, ref_opt, micro)
            assert len(seen) == (1 if i == 0 else 2 + (i == 1))  # step 2: a lost try first
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
            assert tokens == ref_tokens
            _assert_same_params(ours, ref)
    assert (oom.splits, oom.halvings) == (2, 1)
    assert "Out of memory at step 2" in caplog.text
    assert "micro-batch 4 -> 2, micro-batches per step 1 -> 2" in caplog.text


def test_the_retried_step_equals_the_step_in_one_batch(monkeypatch):
    """Same gradient up to float order: a batch of 5 split in 3 + 2 after an OOM gives the
    weights one unsplit step gives."""
    monkeypatch.setenv("TUNE_TEST_OOM_AT_STEP", "1")
    ours, ref = _models(2, seed=1)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, ref))
    batch = padded_collate(_samples(5, seed=3), padding_idx=PAD)
    loss, _ = _step(ours, opt, [batch], OomRetry(CPU))
    ref_loss, _ = _step(ref, ref_opt, [batch])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    _assert_same_params(ours, ref)


class _OomInBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _OomInBackward.calls += 1
        if _OomInBackward.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return grad


def test_oom_in_backward_is_retried_on_one_device():
    ours, ref = _models(2, seed=2)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, ref))

    class FailingOnce(ChunkedCrossEntropyLoss):
        def forward(self, logits, labels):
            return super().forward(_OomInBackward.apply(logits), labels)

    _OomInBackward.calls = 0
    batch = padded_collate(_samples(4, seed=5), padding_idx=PAD)
    oom = OomRetry(CPU)
    loss, _ = _step(ours, opt, [batch], oom, loss_fn=FailingOnce(num_chunks=2))
    ref_loss, _ = _step(ref, ref_opt, split_batch(batch, 2))
    assert oom.splits == 2 and _OomInBackward.calls == 3  # the lost try, then 2 micro-batches
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    _assert_same_params(ours, ref)


def test_the_aborted_try_frees_its_tensors():
    """An OOM raised inside the loss, whose frame holds the forward's output: by the time the
    retry starts, that output (and its graph) is gone, even with the cyclic collector off."""
    (model,) = _models(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs, alive_at_retry = [], []

    class FailingFirst(ChunkedCrossEntropyLoss):
        def forward(self, logits, labels):
            if refs:
                alive_at_retry.append(refs[0]() is not None)
            refs.append(weakref.ref(logits))  # the output of the forward, with its graph
            if len(refs) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return super().forward(logits, labels)

    batch = padded_collate(_samples(4, seed=6), padding_idx=PAD)
    gc.disable()
    try:
        _step(model, opt, [batch], OomRetry(CPU), loss_fn=FailingFirst(num_chunks=2))
    finally:
        gc.enable()
    assert len(refs) == 3 and alive_at_retry == [False, False]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "retries, halvings, why", [(3, 2, "it is 1"), (1, 1, "max_oom_retries=1 reached")]
)
def test_repeated_oom_stops_naming_tune_plan(monkeypatch, retries, halvings, why):
    monkeypatch.setenv("TUNE_TEST_OOM_AT_STEP", "1")
    monkeypatch.setenv("TUNE_TEST_OOM_TIMES", "10")
    model, untouched = _models(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    oom = OomRetry(CPU, max_oom_retries=retries)
    batch = padded_collate(_samples(4, seed=7), padding_idx=PAD)
    with pytest.raises(torch.OutOfMemoryError, match="tune plan") as info:
        _step(model, opt, [batch], oom)
    assert why in str(info.value) and "at step 1" in str(info.value)
    assert oom.halvings == halvings
    _assert_same_params(model, untouched, atol=0)  # nothing was applied


def test_other_errors_are_not_retried():
    (model,) = _models(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    class Broken(nn.Module):
        def forward(self, logits, labels):
            raise RuntimeError("CUDA error: device-side assert triggered")

    oom = OomRetry(CPU)
    batch = padded_collate(_samples(4), padding_idx=PAD)
    with pytest.raises(RuntimeError, match="device-side assert"):
        _step(model, opt, [batch], oom, loss_fn=Broken())
    assert oom.halvings == 0


def test_what_counts_as_out_of_memory():
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator's own error
    assert is_out_of_memory(info.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_bad_settings(monkeypatch):
    with pytest.raises(ValueError, match="max_oom_retries"):
        OomRetry.from_config({"max_oom_retries": -1}, CPU)
    monkeypatch.setenv("TUNE_TEST_OOM_AT_STEP", "three")
    with pytest.raises(ValueError, match="TUNE_TEST_OOM_AT_STEP"):
        OomRetry(CPU)


def test_the_hook_fires_on_its_rank_only(monkeypatch):
    monkeypatch.setenv("TUNE_TEST_OOM_AT_STEP", "1")
    monkeypatch.setenv("TUNE_TEST_OOM_RANK", "1")
    (model,) = _models(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    oom = OomRetry(CPU)  # rank 0
    _step(model, opt, [padded_collate(_samples(4), padding_idx=PAD)], oom)
    assert oom.halvings == 0


def test_oom_in_a_preference_step_halves_the_pairs(monkeypatch):
    monkeypatch.setenv("TUNE_TEST_OOM_AT_STEP", "1")
    one, _ = _lora(tiny_hf_llama(seed=0, vocab_size=VOCAB))
    two = copy.deepcopy(one)
    batch = padded_collate_pairs(_pair_samples(4, seed=2), padding_idx=PAD)
    results = []
    for model, micro, oom in (
        (one, [batch], OomRetry(CPU)),
        (two, split_batch(batch, 2, True), None),
    ):
        params = get_adapter_params(model)
        set_trainable_params(model, params)
        opt = torch.optim.SGD(params.values(), lr=1.0)

        def reference(b, model=model):
            with adapters_disabled(model):
                return sequence_logps(model, b, CPU)

        metrics = preference_step(
            model,
            DPOLoss(0.3),
            opt,
            micro,
            params=params.values(),
            device=CPU,
            reference=reference,
            oom=oom,
        )
        results.append(metrics)
        if oom is not None:
            assert oom.splits == 2
    for k in results[1]:
        assert results[0][k] == pytest.approx(results[1][k], rel=1e-5, abs=1e-6), k
    for (n, p), q in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize(
    "device, env, expected",
    [
        ("cpu", {}, {}),
        ("cuda", {}, {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}),
        ("cuda:1", {}, {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}),
        ("cuda", {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}, None),
        ("cuda", {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, None),
        ("cuda", {"PYTORCH_HIP_ALLOC_CONF": "garbage_collection_threshold:0.6"}, None),
        ("cuda", {"PYTORCH_ALLOC_CONF": ""}, {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}),
    ],
)
def test_cuda_allocator_gets_expandable_segments_unless_configured(device, env, expected):
    environ = dict(env, HOME="/x")
    set_to = configure_cuda_allocator(device, environ)
    want = dict(env, HOME="/x", **(expected or {}))
    assert environ == want
    assert set_to == (expected or {}).get("PYTORCH_ALLOC_CONF")


def test_cuda_allocator_default_device_follows_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    environ = {}
    assert configure_cuda_allocator(None, environ) == "expandable_segments:True"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    environ = {}
    assert configure_cuda_allocator(None, environ) is None and environ == {}
