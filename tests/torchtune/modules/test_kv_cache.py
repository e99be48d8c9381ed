# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Incremental decoding with the KV cache must reproduce one full forward."""

import pytest
import torch

from torchtune.models.llama2 import llama2
from torchtune.modules import KVCache

ATOL, RTOL = 1e-5, 1e-5
VOCAB, MAX_SEQ = 97, 48


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = llama2(
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=MAX_SEQ,
        intermediate_dim=88,
    )
    with torch.no_grad():  # non-trivial norms so every piece matters
        for name, p in m.named_parameters():
            if "scale" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return m.eval()


def test_kv_cache_update_writes_rows_at_positions():
    cache = KVCache(batch_size=3, max_seq_len=10, num_heads=2, head_dim=4, dtype=torch.float32)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    k_out, v_out = cache.update(pos, k, v)
    expected_k = torch.zeros(2, 2, 10, 4)
    expected_v = torch.zeros(2, 2, 10, 4)
    for row in range(2):
        expected_k[row, :, pos[row]] = k[row]
        expected_v[row, :, pos[row]] = v[row]
    torch.testing.assert_close(k_out, expected_k, atol=0, rtol=0)
    torch.testing.assert_close(v_out, expected_v, atol=0, rtol=0)
    with pytest.raises(ValueError, match="batch_size=3"):
        cache.update(
            torch.zeros(4, 1, dtype=torch.long), torch.randn(4, 2, 1, 4), torch.randn(4, 2, 1, 4)
        )


def test_token_by_token_matches_full_forward(model):
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, dtype=torch.float32)
        assert model.caches_are_enabled()
        steps = [
            model(tokens[:, i : i + 1], input_pos=torch.full((2, 1), i, dtype=torch.long))
            for i in range(20)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("cache_len", [None, 25])
def test_prefill_then_decode_matches_full_forward(model, cache_len):
    tokens = torch.randint(0, VOCAB, (3, 25), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=3, dtype=torch.float32, max_seq_len=cache_len)
        for _ in range(2):  # the second round checks reset_caches gives a clean start
            model.reset_caches()
            prefill = model(tokens[:, :9], input_pos=torch.arange(9).expand(3, 9))
            chunk = model(tokens[:, 9:13], input_pos=torch.arange(9, 13).expand(3, 4))
            steps = [
                model(tokens[:, i : i + 1], input_pos=torch.full((3, 1), i, dtype=torch.long))
                for i in range(13, 25)
            ]
            torch.testing.assert_close(
                torch.cat([prefill, chunk, *steps], dim=1), full, atol=ATOL, rtol=RTOL
            )


def test_left_padded_batch_with_user_mask(model):
    """Left-padded batched generation: input_pos = column, mask hides the pad slots.

    RoPE only sees relative positions, so a row shifted right by its padding gives the
    same logits as the unpadded sequence.
    """
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (10, 6)]
    width, new = 10, 5
    pads = [width - len(s) for s in seqs]
    prompt = torch.stack(
        [torch.cat([torch.zeros(p, dtype=torch.long), s]) for p, s in zip(pads, seqs)]
    )
    slots = torch.arange(MAX_SEQ)
    not_pad = torch.stack([slots >= p for p in pads])  # [b, max_seq_len]

    def mask_for(positions):  # [b, s] -> [b, s, max_seq_len]
        return (slots.view(1, 1, -1) <= positions.unsqueeze(-1)) & not_pad.unsqueeze(1)

    extra = torch.randint(0, VOCAB, (2, new), generator=g)
    with torch.no_grad():
        model.setup_caches(batch_size=2, dtype=torch.float32)
        pos = torch.arange(width).expand(2, width)
        out = [model(prompt, input_pos=pos, mask=mask_for(pos))]
        for i in range(new):
            pos = torch.full((2, 1), width + i, dtype=torch.long)
            out.append(model(extra[:, i : i + 1], input_pos=pos, mask=mask_for(pos)))
        out = torch.cat(out, dim=1)
        model.teardown_caches()
        assert not model.caches_are_enabled()
        for row, (p, s) in enumerate(zip(pads, seqs)):
            expected = model(torch.cat([s, extra[row]])[None])
            torch.testing.assert_close(out[row : row + 1, p:], expected, atol=ATOL, rtol=RTOL)


def test_caches_need_input_pos_and_stay_out_of_state_dict(model):
    keys = set(model.state_dict())
    model.setup_caches(batch_size=1, dtype=torch.float32)
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        model.setup_caches(batch_size=1, dtype=torch.float32, max_seq_len=MAX_SEQ + 1)
    with pytest.raises(ValueError, match="input_pos is required"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=str((1, 2, MAX_SEQ))):
        model(
            torch.zeros(1, 2, dtype=torch.long),
            input_pos=torch.arange(2)[None],
            mask=torch.ones(1, 2, 2, dtype=torch.bool),
        )
