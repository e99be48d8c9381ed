# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``generate``: KV-cache decoding vs full recomputation vs transformers' ``generate``.

Greedy decoding is compared token for token with HF's ``generate(do_sample=False)`` on the same
weights, for single prompts and for a left-padded batch of different lengths. Sampling filters
are compared with HF's logits warpers on the same logits.
"""

import pytest
import torch

from tests.test_utils import tiny_hf_llama
from torchtune.models.llama2 import hf_to_tune, llama2
from torchtune.utils import generate, sample_next_token, top_k_filter, top_p_filter

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, MAX_SEQ = 321, 64, 3, 4, 2, 88, 64
EOS, PAD = 2, 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared, busy CPU: extra intra-op threads only spin and wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    hf = tiny_hf_llama(0, num_kv_heads=KV_HEADS, max_position_embeddings=MAX_SEQ)
    ours = llama2(
        vocab_size=VOCAB,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        embed_dim=DIM,
        max_seq_len=MAX_SEQ,
        intermediate_dim=HIDDEN,
    ).eval()
    ours.load_state_dict(hf_to_tune(hf.state_dict()))
    return hf, ours


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    # ids >= 3 so no prompt contains BOS/EOS
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, prompts, max_new_tokens):
    """HF greedy generation on a left-padded batch, cut at EOS like ours."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    result = []
    for row in out[:, width:].tolist():
        result.append(row[: row.index(EOS)] if EOS in row else row)
    return result


@pytest.mark.parametrize("lengths", [[7], [1], [11, 3, 8]], ids=["one", "one_token", "batch"])
def test_greedy_cache_equals_recompute_equals_hf(models, lengths):
    hf, ours = models
    prompts = _prompts(lengths)
    kw = dict(temperature=0.0, stop_tokens=[EOS], pad_id=PAD)
    cached = generate(ours, prompts, 20, **kw)
    recomputed = generate(ours, prompts, 20, use_cache=False, **kw)
    assert cached == recomputed
    assert cached == _hf_greedy(hf, prompts, 20)
    # Each row of a padded batch decodes exactly as it does alone (HF, unpadded).
    assert cached == [_hf_greedy(hf, [p], 20)[0] for p in prompts]
    assert not ours.caches_are_enabled()  # caches the call made are gone again


def test_tensor_prompts_and_existing_caches_are_reused(models):
    _, ours = models
    prompts = _prompts([6, 6], seed=3)
    expected = generate(ours, prompts, 8, temperature=0.0)
    assert generate(ours, torch.tensor(prompts), 8, temperature=0.0) == expected
    assert generate(ours, torch.tensor(prompts[0]), 8, temperature=0.0) == expected[:1]
    ours.setup_caches(batch_size=4, dtype=torch.float32)
    try:
        assert generate(ours, prompts, 8, temperature=0.0) == expected
        assert ours.caches_are_enabled()  # the caller's caches stay
        ours.setup_caches(batch_size=1, dtype=torch.float32)  # too small: generate brings its own
        small = ours.layers[0].attn.kv_cache
        assert generate(ours, prompts, 8, temperature=0.0) == expected
        assert ours.layers[0].attn.kv_cache is small
        with pytest.raises(ValueError, match="use_cache=False"):
            generate(ours, prompts, 8, use_cache=False)
    finally:
        ours.teardown_caches()


def test_stop_tokens_and_stop_fn_cut_each_row(models):
    _, ours = models
    prompts = _prompts([9, 4, 6], seed=1)
    free = generate(ours, prompts, 16, temperature=0.0)
    stop = free[0][3]  # a token row 0 really produces
    stopped = generate(ours, prompts, 16, temperature=0.0, stop_tokens=[stop])
    for row_free, row_stopped in zip(free, stopped):
        cut = row_free.index(stop) if stop in row_free else len(row_free)
        assert row_stopped == row_free[:cut]
    assert len(stopped[0]) == 3

    by_fn = generate(ours, prompts, 16, temperature=0.0, stop_fn=lambda toks: len(toks) >= 5)
    assert by_fn == [row[:5] for row in free]
    assert generate(ours, prompts, 0) == [[], [], []]


def test_sampling_is_seeded_and_cache_independent(models):
    _, ours = models
    prompts = _prompts([5, 10], seed=2)
    kw = dict(temperature=0.8, top_k=50, top_p=0.9)
    a = generate(ours, prompts, 12, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(ours, prompts, 12, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(
        ours, prompts, 12, generator=torch.Generator().manual_seed(7), use_cache=False, **kw
    )
    d = generate(ours, prompts, 12, generator=torch.Generator().manual_seed(8), **kw)
    assert a == b == c
    assert a != d
    # top_k=1 leaves only the argmax: sampling becomes greedy.
    greedy = generate(ours, prompts, 12, temperature=0.0)
    assert generate(ours, prompts, 12, temperature=1.3, top_k=1) == greedy


@pytest.mark.parametrize("top_k", [1, 5, 40])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.95])
def test_filters_match_hf_warpers(top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(top_k)) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    scaled = TemperatureLogitsWarper(0.7)(ids, logits.clone())
    torch.testing.assert_close(
        top_k_filter(logits / 0.7, top_k),
        TopKLogitsWarper(top_k)(ids, scaled.clone()),
        atol=0,
        rtol=0,
    )
    torch.testing.assert_close(
        top_p_filter(logits / 0.7, top_p),
        TopPLogitsWarper(top_p)(ids, scaled.clone()),
        atol=0,
        rtol=0,
    )


def test_sample_next_token_draws_from_filtered_distribution():
    """Empirical frequencies over many draws match softmax of the top-k logits."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).expand(20000, 5)
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, temperature=1.0, top_k=3, generator=g)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    expected = torch.zeros(5)
    expected[:3] = torch.tensor([2.0, 1.0, 0.5]).softmax(0)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    assert torch.equal(sample_next_token(logits[:2], temperature=0.0), torch.tensor([0, 0]))


def test_bad_arguments(models):
    _, ours = models
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        generate(ours, [[5] * 60], 5)
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate(ours, [[5], []], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(ours, [[5]], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(ours, [[5]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(ours, [[5]], 3, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, [[5]], -1)
