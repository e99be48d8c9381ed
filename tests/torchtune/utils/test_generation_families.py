# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Greedy ``generate`` with the KV cache equals transformers' ``generate`` for every family.

Tiny random HF models of each family (llama with Llama 3 features, qwen2, qwen3, mistral,
gemma2 with both soft-caps, gemma3 with its two rotary bases),
left-padded batches of prompts of different lengths, and prompt + new tokens running far past
the sliding window. HF's sliding-window mask compares cache positions (columns of the padded
batch) while its RoPE uses position ids counted from a row's first real token; within one row
both differ from our per-row positions by the same pad count, so the window covers the same
real tokens and the batched, left-padded run must match each prompt decoded alone.
"""

import copy

import pytest
import torch

from tests.test_utils import tiny_hf_llama
from tests.torchtune.models import test_phi3
from tests.torchtune.models.test_hf_families import tiny_hf
from torchtune.models._families import family_for_hf_model_type
from torchtune.utils import generate

EOS, PAD, VOCAB = 2, 0, 321
NEW = 36  # 11 + 36 tokens: past every window (5-7) and past llama3's original 32 positions
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# case -> (tiny_hf case, config overrides); llama is built separately
CASES = {
    "llama3-gqa-tied": None,
    "qwen2-tied-window": ("qwen2-tied-window", {}),  # window on layers 1, 2
    "qwen2-head-dim-mqa-window": ("qwen2-head-dim-mqa-window", {}),
    # windowed on every layer: with one windowed layer of three, greedy tokens barely move
    "qwen3-tied-bias-window": ("qwen3-tied-bias-window", dict(max_window_layers=0)),
    "mistral-window": ("mistral-window", {}),
    # Phi-3: fused qkv / gate_up, partial rotary, LongRoPE's short factors (47 tokens stay
    # within its original 48), window 5 on every layer (untied: tied tiny models repeat one
    # token whatever the window).
    "phi3-all-on": (
        "all-on-tied",
        dict(original_max_position_embeddings=48, tie_word_embeddings=False),
    ),
    # Soft-capped attention and logits, windows on layers 0 and 2 (of 3).
    "gemma2-all": ("gemma2-all", {}),
    # q/k norms, local / global RoPE bases, linear scaling on the global layer.
    "gemma3-all": ("gemma3-all", {}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared, busy CPU: extra intra-op threads only spin and wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hf_model(case: str):
    if case == "llama3-gqa-tied":
        return tiny_hf_llama(
            0,
            head_dim=24,
            num_kv_heads=2,
            tie_word_embeddings=True,
            attention_bias=True,
            rope_scaling=copy.deepcopy(LLAMA3_SCALING),  # HF writes rope_theta into it
            max_position_embeddings=64,
        )
    base, overrides = CASES[case]
    if case.startswith("phi3"):
        return test_phi3.tiny_hf(base, **overrides)
    return tiny_hf(base, **overrides)


def _ours(hf):
    row = family_for_hf_model_type(hf.config.model_type)
    model = row.builder(**row.hf_config_to_builder_kwargs(hf.config.to_dict())).eval()
    model.load_state_dict(row.hf_to_tune(dict(hf.state_dict())))
    return model


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]  # no BOS/EOS


def _hf_greedy(hf, prompts, max_new_tokens):
    """HF greedy generation of a left-padded batch, cut at EOS like ours."""
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
    return [row[: row.index(EOS)] if EOS in row else row for row in out[:, width:].tolist()]


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    hf = _hf_model(request.param)
    return request.param, hf, _ours(hf)


def test_windows_are_shorter_than_the_generated_sequence(pair):
    case, hf, ours = pair
    windows = {layer.attn.sliding_window for layer in ours.layers} - {None}
    if case.startswith("llama"):
        assert not windows
    else:
        assert windows and max(windows) < 11 + NEW


@pytest.mark.parametrize("lengths", [[11], [11, 3, 8]], ids=["one", "batch"])
def test_greedy_with_the_kv_cache_equals_hf_generate(pair, lengths):
    _, hf, ours = pair
    prompts = _prompts(lengths)
    kw = dict(temperature=0.0, stop_tokens=[EOS], pad_id=PAD)
    cached = generate(ours, prompts, NEW, **kw)
    assert cached == _hf_greedy(hf, prompts, NEW)
    assert cached == generate(ours, prompts, NEW, use_cache=False, **kw)
    # Each padded row decodes exactly as its prompt alone, unpadded, in HF.
    assert cached == [_hf_greedy(hf, [p], NEW)[0] for p in prompts]
    assert sum(map(len, cached)) > len(lengths) * 20  # long runs, not early EOS


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("llama")])
def test_without_the_window_the_tokens_differ(case):
    """The windowed cases above could not pass with the window ignored."""
    hf = _hf_model(case)
    ours = _ours(hf)
    prompts = _prompts([11, 3, 8])
    windows = [layer.attn.sliding_window for layer in ours.layers]
    try:
        for layer in ours.layers:
            layer.attn.sliding_window = None
        unbanded = generate(ours, prompts, NEW, temperature=0.0, stop_tokens=[EOS], pad_id=PAD)
    finally:
        for layer, window in zip(ours.layers, windows):
            layer.attn.sliding_window = window
    assert unbanded != _hf_greedy(hf, prompts, NEW)


def _sdpa_nan_on_empty_rows(sdpa):
    """SDPA as kernels that return NaN for a query whose mask row allows no key (CPU's math
    kernel returns 0 there; GPU kernels need not)."""

    def wrapped(q, k, v, attn_mask=None, **kwargs):
        out = sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None:
            allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
            empty = ~allowed.any(dim=-1, keepdim=True)  # [b, 1 or n_h, s, 1]
            out = out.masked_fill(empty, float("nan"))
        return out

    return wrapped


def test_pad_queries_past_a_window_attend_something(monkeypatch):
    """A pad parked far right of its row's real tokens has no real key in its window; it must
    still see its own slot, or a NaN from its empty softmax row reaches the cache (and real
    rows, as 0 * NaN) on kernels that do not zero empty rows."""
    hf = tiny_hf("mistral-window")  # window 5; the batch below has 8 pads in one row
    ours = _ours(hf)
    prompts = _prompts([11, 3, 8])
    expected = _hf_greedy(hf, prompts, 12)
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        _sdpa_nan_on_empty_rows(torch.nn.functional.scaled_dot_product_attention),
    )
    assert generate(ours, prompts, 12, temperature=0.0, stop_tokens=[EOS], pad_id=PAD) == expected


# LongRoPE switching at 16; window 5 (as the other phi3 case), or none: every cached key seen.
# Weights at 5x the default scale: logits large enough that short-factor keys left in the
# cache change greedy tokens (at the default scale they move logits by ~1e-3 only).
_LONGROPE = dict(tie_word_embeddings=False, initializer_range=0.1)
LONGROPE_CASES = {"window": _LONGROPE, "no-window": dict(_LONGROPE, sliding_window=None)}


@pytest.mark.parametrize("case", [pytest.param("window", marks=pytest.mark.slow), "no-window"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "recomputed"])
@pytest.mark.parametrize("lengths", [[11], [11, 3, 8], [16], [20, 5]])
def test_longrope_past_its_original_length_equals_hf_generate(case, use_cache, lengths):
    """Across LongRoPE's switch (original length 16; 30 new tokens) transformers re-encodes
    the whole sequence with the long factors when the cache first holds 16 columns; the cached
    path does the same, the cache-free one recomputes every step. Prompts of 16 cross at the
    first decoded token, of 20 take the long factors from the prefill on."""
    hf = test_phi3.tiny_hf("all-on-tied", **LONGROPE_CASES[case])
    ours = _ours(hf)
    assert {m.switch_length for m in ours.modules() if hasattr(m, "switch_length")} == {16}
    prompts = _prompts(lengths)
    kw = dict(temperature=0.0, stop_tokens=[EOS], pad_id=PAD, use_cache=use_cache)
    got = generate(ours, prompts, 30, **kw)
    assert got == _hf_greedy(hf, prompts, 30)
    assert sum(map(len, got)) > len(lengths) * 20  # long runs, not early EOS


def test_longrope_cached_without_the_re_encode_differs(monkeypatch):
    """The test above could not pass with a cache that kept its short-factor keys (and a
    table picked by the parked pad slots)."""
    from torchtune.utils import _generation

    hf = test_phi3.tiny_hf("all-on-tied", **LONGROPE_CASES["no-window"])
    ours = _ours(hf)
    prompts = _prompts([11, 3, 8])
    kw = dict(temperature=0.0, stop_tokens=[EOS], pad_id=PAD)
    expected = _hf_greedy(hf, prompts, 30)
    assert generate(ours, prompts, 30, **kw) == expected
    monkeypatch.setattr(_generation, "_length_dependent_ropes", lambda model: [])
    assert generate(ours, prompts, 30, **kw) != expected
    assert generate(ours, prompts[:1], 30, **kw) != expected[:1]  # the re-encode alone
