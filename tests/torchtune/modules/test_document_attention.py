# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Attention document by document (``DocumentMask``) against HF, our dense block-causal mask
and each document alone."""

import pytest
import torch

from tests.torchtune.modules.test_layers import _additive, _attention_pair, _block_causal
from torchtune.data import padded_collate
from torchtune.datasets import PackedDataset
from torchtune.models.llama2 import llama2
from torchtune.modules import attention as attention_module
from torchtune.modules.attention import DocumentMask

ROWS = [[37, 50, 41], [64, 33, 31]]  # documents of 31-64 tokens, rows of 128


def _documents(rows):
    """The ``DocumentMask`` of rows of document lengths, and the restarting positions."""
    _, pos = _block_causal(rows)
    return DocumentMask(tuple(n for row in rows for n in row)), pos


def test_packed_rows_collate_to_their_document_mask():
    g = torch.Generator().manual_seed(0)
    lengths = [40, 70, 35, 90, 60, 33]
    samples = [{"tokens": torch.randint(3, 50, (n,), generator=g).tolist()} for n in lengths]
    for sample in samples:
        sample["labels"] = list(sample["tokens"])
    rows = PackedDataset(samples, max_seq_len=128)
    batch = padded_collate([rows[i] for i in range(len(rows))], padding_idx=0)
    doc = batch["mask"]
    assert isinstance(doc, DocumentMask)
    assert doc.lengths == tuple(n for i in range(len(rows)) for n in rows[i]["seq_lens"])
    assert sum(doc.lengths) == batch["tokens"].numel()
    # Every document (padding tails included) is a run of positions 0, 1, ..., n - 1.
    expected = torch.unique_consecutive(
        (batch["input_pos"] == 0).flatten().cumsum(0), return_counts=True
    )[1]
    assert doc.lengths == tuple(expected.tolist())
    # The documents as a dense mask are the block-causal mask of the rows.
    mask, _ = _block_causal([rows[i]["seq_lens"] for i in range(len(rows))])
    ids = doc.document_ids().view(mask.shape[:2])
    causal = torch.ones(128, 128, dtype=torch.bool).tril()
    assert torch.equal((ids[:, :, None] == ids[:, None, :]) & causal, mask)


def test_document_mask_lengths_must_be_positive_ints():
    assert DocumentMask([3, 4]).lengths == (3, 4)  # stored as a tuple: hashable, comparable
    for bad in ([3, 0], [-1], [2.0], [True]):
        with pytest.raises(ValueError, match="positive ints"):
            DocumentMask(bad)


def test_decoder_uses_a_dense_mask_as_given(monkeypatch):
    # A dense block-causal mask is no longer turned into documents (nothing on the training
    # path passes one): it runs through SDPA as a mask, with the same logits.
    torch.manual_seed(0)
    model = llama2(
        vocab_size=97,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=40,
        intermediate_dim=60,
        max_seq_len=128,
    )
    mask, pos = _block_causal(ROWS)
    doc, _ = _documents(ROWS)
    tokens = torch.randint(3, 97, (2, 128))
    calls = []
    real = attention_module._attention_by_document
    monkeypatch.setattr(
        attention_module,
        "_attention_by_document",
        lambda *a, **k: calls.append(a[3].lengths) or real(*a, **k),
    )
    with torch.no_grad():
        dense = model(tokens, mask=mask, input_pos=pos)
        assert calls == []
        by_document = model(tokens, mask=doc, input_pos=pos)
        assert len(calls) == 2
    torch.testing.assert_close(dense, by_document, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_attention_by_document_matches_hf_and_the_dense_mask(num_heads, num_kv_heads):
    torch.manual_seed(0)
    ref, ours, rope_ref = _attention_pair(num_heads, num_kv_heads, max_seq_len=128)
    mask, pos = _block_causal(ROWS)
    doc, _ = _documents(ROWS)
    x = torch.randn(2, 128, 64, requires_grad=True)
    with torch.no_grad():
        expected, _ = ref(x, position_embeddings=rope_ref(x, pos), attention_mask=_additive(mask))
    results = []
    for m in (doc, mask):
        ours.zero_grad()
        x.grad = None
        out = ours(x, mask=m, input_pos=pos)
        (out**2).sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in ours.parameters()])
    torch.testing.assert_close(results[0][0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for by_doc, dense in zip(results[0][1:], results[1][1:]):
        # Gradients sum over 256 tokens in another order: fp32 rounding relative to their scale.
        scale = dense.abs().max().item()
        torch.testing.assert_close(by_doc, dense, atol=2e-6 * scale, rtol=1e-5)


def test_decoder_runs_packed_rows_by_document_with_the_same_logits(monkeypatch):
    torch.manual_seed(0)
    model = llama2(
        vocab_size=97,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=40,
        intermediate_dim=60,
        max_seq_len=128,
    )
    doc, pos = _documents(ROWS)
    tokens = torch.randint(3, 97, (2, 128))
    calls = []
    real = attention_module._attention_by_document
    monkeypatch.setattr(
        attention_module,
        "_attention_by_document",
        lambda *a, **k: calls.append(a[3].lengths) or real(*a, **k),
    )
    packed = model(tokens, mask=doc, input_pos=pos)
    assert calls == [(37, 50, 41, 64, 33, 31)] * 2  # once per layer
    # Each document alone, plain causal attention: what packing must reproduce.
    start = 0
    flat_tokens, flat_logits = tokens.flatten(), packed.flatten(0, 1)
    for n in calls[0]:
        alone = model(flat_tokens[start : start + n].unsqueeze(0))[0]
        torch.testing.assert_close(flat_logits[start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_document_mask_misuse_raises():
    _, ours, _ = _attention_pair(4, 4, max_seq_len=128)
    x = torch.randn(2, 128, 64)
    with pytest.raises(ValueError, match="sum to 100, expected b \\* s = 256"):
        ours(x, mask=DocumentMask((50, 50)))
    ours.kv_cache = object()  # any cache
    with pytest.raises(ValueError, match="cache-free"):
        ours(x, mask=DocumentMask((128, 128)), input_pos=torch.zeros(2, 128, dtype=torch.long))


@pytest.mark.parametrize("setting", [True, "selective"])
def test_document_attention_under_activation_checkpointing(setting):
    # The DocumentMask is a plain argument of each checkpointed layer; recompute must see it.
    from torchtune.utils import apply_activation_checkpointing

    shape = dict(
        vocab_size=97,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=40,
        intermediate_dim=60,
        max_seq_len=128,
    )
    doc, pos = _documents(ROWS)
    tokens = torch.randint(3, 97, (2, 128), generator=torch.Generator().manual_seed(1))
    grads = []
    for ac in (False, setting):
        torch.manual_seed(0)
        model = llama2(**shape)
        apply_activation_checkpointing(model, ac)
        (model(tokens, mask=doc, input_pos=pos) ** 2).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_layer_runs_documents_eagerly_without_recompiling():
    # The per-document loop is excluded from compilation, so new lengths reuse the graphs.
    shape = dict(
        vocab_size=97,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        intermediate_dim=96,
        max_seq_len=128,
    )
    torch.manual_seed(0)
    eager = llama2(**shape).layers[0]
    compiled = llama2(**shape).layers[0]
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    x = torch.randn(2, 128, 64, requires_grad=True)
    for i, rows in enumerate([ROWS, [[128], [40, 88]], [[60, 68], [32, 32, 64]]]):
        doc, pos = _documents(rows)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(x, mask=doc, input_pos=pos)
        want = eager(x, mask=doc, input_pos=pos)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        (g_got,) = torch.autograd.grad(got.sum(), x)
        (g_want,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)
