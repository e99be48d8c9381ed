# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Whole-model parity of the native Llama2 with HF's LlamaForCausalLM on converted weights."""

import pytest
import torch

from tests.test_utils import tiny_hf_llama
from torchtune.models.llama2 import (
    hf_to_tune,
    llama2,
    llama2_7b,
    llama2_13b,
    llama2_70b,
    tune_to_hf,
)

ATOL, RTOL = 1e-5, 1e-5
VOCAB, DIM, LAYERS, HEADS, HIDDEN, MAX_SEQ = 321, 64, 3, 4, 88, 256


def _pair(num_kv_heads: int, seed: int = 0):
    hf = tiny_hf_llama(seed, num_kv_heads=num_kv_heads)
    ours = llama2(
        vocab_size=VOCAB,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=num_kv_heads,
        embed_dim=DIM,
        max_seq_len=MAX_SEQ,
        intermediate_dim=HIDDEN,
    ).eval()
    ours.load_state_dict(hf_to_tune(hf.state_dict()))
    return hf, ours


@pytest.fixture(scope="module", params=[4, 2, 1], ids=["mha", "gqa", "mqa"])
def models(request):
    return _pair(request.param)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("seq_len", [1, 17, 128])
def test_logits_match_hf(models, batch_size, seq_len):
    hf, ours = models
    tokens = torch.randint(
        0, VOCAB, (batch_size, seq_len), generator=torch.Generator().manual_seed(seq_len)
    )
    with torch.no_grad():
        expected = hf(tokens).logits
        logits = ours(tokens)
    assert logits.shape == (batch_size, seq_len, VOCAB) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_packed_mask_matches_separate_hf_forwards(models):
    """Two samples packed in one row with a block-causal mask = two independent HF forwards."""
    hf, ours = models
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randint(0, VOCAB, (1, 9), generator=g),
        torch.randint(0, VOCAB, (1, 14), generator=g),
    )
    tokens = torch.cat([a, b], dim=1)
    mask = torch.block_diag(torch.ones(9, 9).tril(), torch.ones(14, 14).tril()).bool()[None]
    input_pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    with torch.no_grad():
        expected = torch.cat([hf(a).logits, hf(b).logits], dim=1)
        logits = ours(tokens, mask=mask, input_pos=input_pos)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_state_dict_round_trips_to_hf():
    hf, ours = _pair(2)
    back = tune_to_hf(ours.state_dict())
    ref = hf.state_dict()
    assert set(back) == set(ref)
    for key, value in back.items():
        torch.testing.assert_close(value, ref[key], atol=0, rtol=0)


def test_native_state_dict_keys():
    _, ours = _pair(2)
    keys = set(ours.state_dict())
    expected = {"tok_embeddings.weight", "norm.scale", "output.weight"}
    for i in range(LAYERS):
        expected |= {f"layers.{i}.sa_norm.scale", f"layers.{i}.mlp_norm.scale"}
        expected |= {
            f"layers.{i}.attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "output_proj")
        }
        expected |= {f"layers.{i}.mlp.{w}.weight" for w in ("w1", "w2", "w3")}
    assert keys == expected


def test_bf16_error_no_worse_than_hf():
    """In bf16 our logits stay as close to the fp32 reference as HF's own bf16 logits."""
    hf, ours = _pair(2)
    tokens = torch.randint(0, VOCAB, (3, 128), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = hf(tokens).logits
        hf_err = (hf.to(torch.bfloat16)(tokens).logits.float() - reference).abs().max()
        logits = ours.to(torch.bfloat16)(tokens)
    assert logits.dtype == torch.bfloat16
    our_err = (logits.float() - reference).abs().max()
    assert our_err <= 1.5 * hf_err, (our_err, hf_err)


def test_bad_inputs_raise():
    _, ours = _pair(2)
    with pytest.raises(ValueError, match="max_seq_len"):
        ours(torch.zeros(1, MAX_SEQ + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ours(torch.zeros(2, 4, dtype=torch.long), mask=torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_pos must have shape"):
        ours(torch.zeros(2, 4, dtype=torch.long), input_pos=torch.arange(4)[None])
    with pytest.raises(ValueError, match="num_kv_heads"):
        llama2(
            vocab_size=10, num_layers=1, num_heads=4, num_kv_heads=3, embed_dim=16, max_seq_len=8
        )


@pytest.mark.parametrize(
    "builder,expected",
    [(llama2_7b, 6_738_415_616), (llama2_13b, 13_015_864_320), (llama2_70b, 68_976_648_192)],
)
def test_param_counts_on_meta(builder, expected):
    with torch.device("meta"):
        model = builder()
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("assign", [False, True])
def test_meta_device_build_then_load(models, assign):
    """The distributed recipe builds on meta, materialises, then loads: same logits as HF."""
    hf, _ = models
    kv = hf.config.num_key_value_heads
    with torch.device("meta"):
        ours = llama2(
            vocab_size=VOCAB,
            num_layers=LAYERS,
            num_heads=HEADS,
            num_kv_heads=kv,
            embed_dim=DIM,
            max_seq_len=MAX_SEQ,
            intermediate_dim=HIDDEN,
        ).eval()
    sd = hf_to_tune(hf.state_dict())
    if assign:
        ours.load_state_dict(sd, assign=True)  # RoPE cache stays meta until first forward
    else:
        ours.to_empty(device="cpu")
        ours.load_state_dict(sd)
    tokens = torch.randint(0, VOCAB, (2, 31), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=RTOL)
