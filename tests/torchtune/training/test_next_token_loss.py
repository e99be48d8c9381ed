# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``next_token_loss_sum`` drops the unscored tail of every document: same loss and grads as
scoring the full logits of the batch as it came, with less work."""

import pytest
import torch
import torch.nn.functional as F

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate
from torchtune.datasets import PackedDataset
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules import DocumentMask
from torchtune.training import ChunkedCrossEntropyLoss, LinearCrossEntropyLoss, next_token_loss_sum
from torchtune.training._next_token_loss import drop_unscored_tails

IGNORE = CROSS_ENTROPY_IGNORE_IDX
SHAPE = dict(
    vocab_size=97,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=40,
    intermediate_dim=60,
    max_seq_len=64,
)
# (length, prompt length): documents long enough for per-document attention (mean >= 32);
# one is all prompt, so nothing of it is scored.
SAMPLES = [(40, 3), (35, 10), (50, 50), (45, 5), (33, 2), (38, 38), (44, 20)]


def _samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n, n_prompt in SAMPLES:
        tokens = torch.randint(3, 97, (n,), generator=g).tolist()
        out.append({"tokens": tokens, "labels": [IGNORE] * n_prompt + tokens[n_prompt:]})
    return out


def _packed_batch():
    rows = PackedDataset(_samples(), max_seq_len=64)
    return padded_collate([rows[i] for i in range(len(rows))], padding_idx=0)


def _padded_batch():
    return padded_collate(_samples(), padding_idx=0)


def _model(lora: bool):
    torch.manual_seed(0)
    if not lora:
        return llama2(**SHAPE)
    model = lora_llama2(["q_proj", "v_proj"], **SHAPE, lora_rank=4, lora_alpha=8.0)
    for n, p in model.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p, std=0.1)  # not the zero init: the adapter matters
        elif "lora" not in n:
            p.requires_grad_(False)
    return model


def dense_block_causal(mask: DocumentMask, b: int, s: int) -> torch.Tensor:
    """The reference's ``BoolTensor[b, s, s]`` for a ``DocumentMask`` (test-side only)."""
    docs = mask.document_ids().view(b, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (docs[:, :, None] == docs[:, None, :]) & causal


def _reference(model, batch):
    # Full logits of the batch as it came, with a dense block-causal mask for packed rows,
    # scored at logits[:, :-1] against labels[:, 1:].
    mask = batch.get("mask")
    if mask is not None:
        mask = dense_block_causal(mask, *batch["tokens"].shape)
    logits = model(batch["tokens"], mask=mask, input_pos=batch.get("input_pos"))
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(
        flat, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _attention_masks(model):
    """Record the mask every attention layer is called with; returns (list, remove)."""
    seen = []
    hooks = [
        layer.attn.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs.get("mask")), with_kwargs=True
        )
        for layer in model.layers
    ]
    return seen, lambda: [h.remove() for h in hooks]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("data", ["packed", "padded"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("loss", ["linear", "chunked"])
def test_dropping_unscored_tails_keeps_loss_and_grads(data, lora, loss):
    model = _model(lora)
    batch = _packed_batch() if data == "packed" else _padded_batch()
    loss_fn = (
        LinearCrossEntropyLoss(num_chunks=3)
        if loss == "linear"
        else ChunkedCrossEntropyLoss(num_chunks=3)
    )
    # The collated batch holds no dense mask: packed rows carry a DocumentMask.
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 3 for v in batch.values())
    assert isinstance(batch.get("mask"), DocumentMask) == (data == "packed")

    want = _reference(model, batch)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    masks, remove = _attention_masks(model)
    got, n_scored = next_token_loss_sum(model, loss_fn, batch, torch.device("cpu"))
    hook.remove()
    remove()
    got.backward()

    # Every layer attended document by document: no dense mask reached attention.
    assert len(masks) == SHAPE["num_layers"]
    assert all(isinstance(m, DocumentMask) for m in masks)

    # The model saw one row with the unscored tails gone, not the padded batch.
    b, s = batch["tokens"].shape
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][1] < b * s
    assert int(n_scored) == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    got_grads = _grads(model)
    assert set(got_grads) == set(want_grads) and want_grads
    for name in want_grads:
        torch.testing.assert_close(
            got_grads[name],
            want_grads[name],
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_drop_unscored_tails_cuts_each_document_after_its_last_scored_position():
    # Two rows of 40: row 0 holds documents of 34 (scored up to 30) and 6 (padding, unscored);
    # row 1 is one document scored at 0..35 and not after.
    pos = torch.cat([torch.arange(34), torch.arange(6)]).unsqueeze(0)
    batch = {
        "tokens": torch.arange(80).view(2, 40),
        "mask": DocumentMask((34, 6, 40)),
        "input_pos": torch.cat([pos, torch.arange(40).unsqueeze(0)]),
    }
    scored = torch.zeros(2, 40, dtype=torch.bool)
    scored[0, 2:31] = True
    scored[1, :36] = True
    flat, keep = drop_unscored_tails(batch, scored)
    assert flat["mask"] == DocumentMask((31, 36))
    want_tokens = torch.cat([torch.arange(31), torch.arange(40, 76)])
    torch.testing.assert_close(flat["tokens"], want_tokens.unsqueeze(0))
    want_pos = torch.cat([torch.arange(31), torch.arange(36)]).unsqueeze(0)
    torch.testing.assert_close(flat["input_pos"], want_pos)
    torch.testing.assert_close(keep.nonzero().flatten(), want_tokens)


def test_drop_unscored_tails_flattens_short_documents_too():
    # Packed rows run document by document anyway, so short documents are cut as well.
    batch = {
        "tokens": torch.zeros(2, 40, dtype=torch.long),
        "mask": DocumentMask((4,) * 20),
        "input_pos": torch.arange(4).repeat(20).view(2, 40),
    }
    scored = torch.zeros(2, 40, dtype=torch.bool)
    scored[:, ::4] = True  # the first token of each document only
    flat, keep = drop_unscored_tails(batch, scored)
    assert flat["mask"] == DocumentMask((1,) * 20)
    torch.testing.assert_close(keep, scored.flatten())


def test_drop_unscored_tails_declines_where_it_does_not_apply():
    scored = torch.ones(2, 40, dtype=torch.bool)
    tokens = torch.zeros(2, 40, dtype=torch.long)
    # Unmasked rows scored to the end: nothing to drop.
    assert drop_unscored_tails({"tokens": tokens}, scored) is None
    # Packed rows scored to the end of every document: nothing to drop either.
    packed = {"tokens": tokens, "mask": DocumentMask((30, 10, 40))}
    assert drop_unscored_tails(packed, scored) is None
    # A dense mask (a padding mask over keys, say) is not cut.
    odd = torch.ones(2, 40, 40, dtype=torch.bool).tril()
    odd[:, :, 0] = False
    assert drop_unscored_tails({"tokens": tokens, "mask": odd}, scored) is None
    # Unmasked rows whose kept prefixes are too short on average for attention by document:
    # batched causal SDPA over the rows is cheaper.
    early = torch.zeros(2, 40, dtype=torch.bool)
    early[:, :10] = True
    assert drop_unscored_tails({"tokens": tokens}, early) is None
    # Nothing scored at all.
    none = torch.zeros(2, 40, dtype=torch.bool)
    assert drop_unscored_tails({"tokens": tokens}, none) is None
    # A DocumentMask that does not cover the batch.
    with pytest.raises(ValueError, match="lengths sum to 70, expected b \\* s = 80"):
        drop_unscored_tails({"tokens": tokens, "mask": DocumentMask((30, 40))}, scored)


def test_decoder_takes_a_document_mask_for_a_flattened_batch():
    torch.manual_seed(3)
    model = llama2(**SHAPE).eval()
    tokens = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        rows = model(tokens)  # [2, 50, vocab]: each row one causal document
        flat = model(
            tokens.view(1, 100),
            mask=DocumentMask((50, 50)),
            input_pos=torch.arange(50).repeat(2).unsqueeze(0),
        )
    # Longer than max_seq_len (64) as one row; each document fits.
    torch.testing.assert_close(flat.view(2, 50, -1), rows, rtol=1e-5, atol=1e-5)

    pos = torch.arange(50).repeat(2).unsqueeze(0)
    with pytest.raises(ValueError, match="lengths sum to 90, expected b \\* s = 100"):
        model(tokens.view(1, 100), mask=DocumentMask((50, 40)), input_pos=pos)
    with pytest.raises(ValueError, match="needs input_pos"):
        model(tokens.view(1, 100), mask=DocumentMask((50, 50)))
    with pytest.raises(ValueError, match="Document length 70 exceeds max_seq_len 64"):
        model(tokens.view(1, 100), mask=DocumentMask((70, 30)), input_pos=pos)
