# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``TransformerDecoder(output_mask=...)``: logits only where labels are, same loss and grads."""

import pytest
import torch
import torch.nn.functional as F

from tests.torchtune.training.test_next_token_loss import dense_block_causal
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate
from torchtune.datasets import PackedDataset
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.training import ChunkedCrossEntropyLoss, LinearCrossEntropyLoss, next_token_loss_sum

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


def _packed_batch():
    # Samples with a prompt (label CROSS_ENTROPY_IGNORE_IDX) and a response, packed as training
    # sees them: short documents (mean under 32 tokens).
    g = torch.Generator().manual_seed(0)
    samples = []
    for n, n_prompt in [(11, 5), (7, 3), (13, 13), (9, 2), (17, 6), (5, 1)]:
        tokens = torch.randint(3, 97, (n,), generator=g).tolist()
        samples.append({"tokens": tokens, "labels": [IGNORE] * n_prompt + tokens[n_prompt:]})
    rows = PackedDataset(samples, max_seq_len=24)
    batch = padded_collate([rows[i] for i in range(len(rows))], padding_idx=0)
    assert (batch["labels"] == IGNORE).float().mean() > 0.3  # plenty of unscored positions
    return batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _full_path(model, batch, loss_fn):
    # The reference: full logits under the dense block-causal mask of the batch's documents.
    mask = dense_block_causal(batch["mask"], *batch["tokens"].shape)
    logits = model(batch["tokens"], mask=mask, input_pos=batch["input_pos"])
    return loss_fn(logits[:, :-1], batch["labels"][:, 1:])


def _output_mask_path(model, batch, loss_fn):
    # What the training recipes' _loss_sum does.
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    scored = targets != IGNORE
    logits = model(
        batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"], output_mask=scored
    )
    assert logits.shape == (int(scored.sum()), SHAPE["vocab_size"])
    return loss_fn(logits.unsqueeze(0), targets[scored].unsqueeze(0))


def _plain_ce(logits, labels):
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum"), None


def _fused_path(model, batch, _):
    # What the training recipes' _loss_sum does with the fused projection + CE loss.
    return next_token_loss_sum(model, LinearCrossEntropyLoss(num_chunks=3), batch, "cpu")


def _model(lora: bool, lora_output: bool = False):
    torch.manual_seed(0)
    if not lora:
        return llama2(**SHAPE)
    model = lora_llama2(
        ["q_proj", "v_proj"], apply_lora_to_output=lora_output, **SHAPE, lora_rank=4, lora_alpha=8.0
    )
    for n, p in model.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p, std=0.1)  # not the zero init: the adapter matters
        elif "lora" not in n:
            p.requires_grad_(False)  # as the LoRA recipes train
    return model


@pytest.mark.parametrize("lora", [False, True, "output"])
@pytest.mark.parametrize("loss", ["chunked", "plain", "fused"])
def test_output_mask_gives_the_full_paths_loss_and_grads(lora, loss):
    model = _model(bool(lora), lora_output=lora == "output")
    loss_fn = ChunkedCrossEntropyLoss(num_chunks=3) if loss == "chunked" else _plain_ce
    path = _fused_path if loss == "fused" else _output_mask_path
    batch = _packed_batch()

    want, _ = _full_path(model, batch, loss_fn if loss != "fused" else _plain_ce)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got, _ = path(model, batch, loss_fn)
    got.backward()
    got_grads = _grads(model)

    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert set(got_grads) == set(want_grads) and want_grads
    for name in want_grads:
        torch.testing.assert_close(
            got_grads[name],
            want_grads[name],
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_output_mask_selects_the_full_logits():
    torch.manual_seed(1)
    model = llama2(**SHAPE).eval()
    tokens = torch.randint(0, 97, (3, 10))
    keep = torch.rand(3, 10) > 0.5
    with torch.no_grad():
        full = model(tokens)
        torch.testing.assert_close(
            model(tokens, output_mask=keep), full[keep], rtol=1e-6, atol=1e-6
        )
        none = model(tokens, output_mask=torch.zeros(3, 10, dtype=torch.bool))
        hidden = model(tokens, output_mask=keep, return_hidden=True)
    assert none.shape == (0, 97)
    assert hidden.shape == (int(keep.sum()), SHAPE["embed_dim"])
    torch.testing.assert_close(model.output(hidden), full[keep], rtol=1e-6, atol=1e-6)


def test_output_mask_bad_shape_or_dtype_raises():
    model = llama2(**SHAPE)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"output_mask must be a bool tensor of shape \(2, 5\)"):
        model(tokens, output_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="output_mask.*torch.int64"):
        model(tokens, output_mask=torch.ones(2, 5, dtype=torch.long))


def test_bool_mask_with_an_empty_row_gives_finite_logits_and_grads():
    # The decoder turns the bool mask into SDPA's additive form once; a query row that may
    # attend nothing (padding in a packed row) must still give zeros, not NaN.
    torch.manual_seed(2)
    model = llama2(**SHAPE)
    tokens = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, 6, dtype=torch.bool).tril()
    mask[0, 2] = False
    logits = model(tokens, mask=mask)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # Rows that may attend something are unaffected by how the mask is passed.
    with torch.no_grad():
        causal = model(tokens)
    torch.testing.assert_close(logits[1], causal[1], rtol=1e-6, atol=1e-6)
