# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Per-module parity against Hugging Face's Llama pieces on the same weights and inputs."""

import pytest
import torch
from transformers.models.llama import modeling_llama as hf_llama

from tests.test_utils import tiny_hf_llama_config
from torchtune.modules import (
    CausalSelfAttention,
    FeedForward,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TransformerDecoderLayer,
)
from torchtune.modules.position_embeddings import _RotateHalves, rotate_halves
from torchtune.modules.rms_norm import _RMSNormFunction

ATOL, RTOL = 1e-5, 1e-5


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """Bool [b, s, t] (True = attend) -> HF eager's additive float mask [b, 1, s, t]."""
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]


def test_rms_norm_matches_hf():
    torch.manual_seed(0)
    ref = hf_llama.LlamaRMSNorm(37, eps=1e-5)
    ours = RMSNorm(37, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(37))
        ours.scale.copy_(ref.weight)
    x = torch.randn(3, 5, 37) * 4
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=RTOL)
    xb = x.bfloat16()
    torch.testing.assert_close(ours.bfloat16()(xb), ref.bfloat16()(xb), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_backward_matches_hf(dtype):
    # Ours recomputes the statistic in backward and uses the closed-form gradient.
    torch.manual_seed(0)
    ref = hf_llama.LlamaRMSNorm(37, eps=1e-5).to(dtype)
    ours = RMSNorm(37, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(37))
        ours.scale.copy_(ref.weight)
    x = (torch.randn(3, 5, 37) * 4).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 5, 37).to(dtype)
    got = torch.autograd.grad(ours(x), [x, ours.scale], grad_out)
    want = torch.autograd.grad(ref(x), [x, ref.weight], grad_out)
    tol = dict(atol=ATOL, rtol=RTOL) if dtype == torch.float32 else {}
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, **tol)
    # Only the input (and the scale, a parameter) are kept for backward.
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        ours(x)
    assert len(kept) == 2 and kept[0] is x


def test_rms_norm_double_precision_gradcheck():
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: _RMSNormFunction.apply(x, s, 1e-5), (x, scale))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("explicit_pos", [False, True])
def test_rope_matches_hf_forward_and_backward(explicit_pos, compiled):
    # Same layout as HF (rotate_half on each head's halves): no permutation in between.
    torch.manual_seed(0)
    cfg = tiny_hf_llama_config(hidden_size=96, num_heads=3, max_position_embeddings=64)
    b, s, n_h, h_d = 2, 13, 3, 32
    rope_ref = hf_llama.LlamaRotaryEmbedding(cfg)
    rope = RotaryPositionalEmbeddings(h_d, max_seq_len=64, base=cfg.rope_parameters["rope_theta"])
    pos = torch.randint(0, 64, (b, s)) if explicit_pos else torch.arange(s).expand(b, s)
    x = torch.randn(b, s, n_h, h_d, requires_grad=True)
    grad_out = torch.randn(b, s, n_h, h_d)
    cos, sin = rope_ref(x, pos)
    ref, _ = hf_llama.apply_rotary_pos_emb(x.transpose(1, 2), x[:1].transpose(1, 2), cos, sin)
    ref = ref.transpose(1, 2)  # [b, s, n_h, h_d]
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
    arg = pos if explicit_pos else None
    fn = torch.compile(rope, backend="aot_eager", fullgraph=True) if compiled else rope
    out = fn(x, input_pos=arg)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    xb = x.detach().bfloat16()
    out_b = rope(xb, input_pos=arg)
    assert out_b.dtype == torch.bfloat16
    # The math runs in fp32 and is rounded once.
    torch.testing.assert_close(out_b, rope(xb.float(), input_pos=arg).bfloat16(), atol=0, rtol=0)


def test_rope_rotates_each_pair_by_its_angle():
    """Plain-PyTorch derivation: pair (x[i], x[i + d/2]) at position p turns by p * theta_i."""
    torch.manual_seed(0)
    d, base = 8, 500.0
    rope = RotaryPositionalEmbeddings(d, max_seq_len=16, base=base)
    x = torch.randn(1, 5, 2, d, dtype=torch.float32)
    pos = torch.tensor([[0, 3, 15, 7, 1]])
    out = rope(x, input_pos=pos)
    want = torch.empty_like(x)
    for t in range(5):
        for i in range(d // 2):
            angle = torch.tensor(pos[0, t].item() * base ** (-2 * i / d), dtype=torch.float64)
            c, s_ = angle.cos().float(), angle.sin().float()
            a, b_ = x[0, t, :, i], x[0, t, :, i + d // 2]
            want[0, t, :, i] = a * c - b_ * s_
            want[0, t, :, i + d // 2] = b_ * c + a * s_
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_rope_closed_form_backward_matches_the_plain_form():
    # Eager runs _RotateHalves (gradient = grad rotated by -angle), compile the plain form.
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 10, dtype=torch.float64, requires_grad=True)
    angle = torch.randn(1, 7, 1, 5, dtype=torch.float64)
    cos, sin = angle.cos(), angle.sin()
    assert torch.autograd.gradcheck(lambda t: _RotateHalves.apply(t, cos, sin), (x,))
    # Its backward is differentiable too (torch.func.grad, double backward).
    assert torch.autograd.gradgradcheck(lambda t: _RotateHalves.apply(t, cos, sin), (x,))
    func_grad = torch.func.grad(lambda t: (_RotateHalves.apply(t, cos, sin) ** 2).sum())(x)
    torch.testing.assert_close(func_grad, 2 * x.detach())  # a rotation keeps the norm
    x32, cos32, sin32 = x.detach().float().requires_grad_(), cos.float(), sin.float()
    for grad_out in (torch.randn(2, 7, 3, 10), torch.ones(1).expand(2, 7, 3, 10)):
        out, ref = _RotateHalves.apply(x32, cos32, sin32), rotate_halves(x32, cos32, sin32)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        got, want = (torch.autograd.grad(t, x32, grad_out)[0] for t in (out, ref))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_rope_cache_is_fp32_non_persistent_and_meta_safe():
    rope = RotaryPositionalEmbeddings(16, max_seq_len=32)
    assert "cache" not in rope.state_dict()
    expected = rope.cache.clone()
    assert rope.to(torch.bfloat16).cache.dtype == torch.float32
    torch.testing.assert_close(rope.cache, expected, atol=0, rtol=0)
    with torch.device("meta"):
        meta_rope = RotaryPositionalEmbeddings(16, max_seq_len=32)
    meta_rope.to_empty(device="cpu")
    torch.testing.assert_close(meta_rope.cache, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="even dim"):
        RotaryPositionalEmbeddings(15)


def test_feed_forward_matches_hf():
    torch.manual_seed(0)
    cfg = tiny_hf_llama_config(hidden_size=40, intermediate_size=88)
    ref = hf_llama.LlamaMLP(cfg)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
    ours = FeedForward(lin(40, 88), lin(88, 40), lin(40, 88))
    ours.load_state_dict(
        {
            "w1.weight": ref.gate_proj.weight,
            "w2.weight": ref.down_proj.weight,
            "w3.weight": ref.up_proj.weight,
        }
    )
    x = torch.randn(3, 7, 40)
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=RTOL)
    # Backward, too: input and every weight gradient (silu is recomputed in ours).
    x.requires_grad_()
    grad_out = torch.randn(3, 7, 40)
    got = torch.autograd.grad(ours(x), [x, *ours.parameters()], grad_out)
    want = torch.autograd.grad(
        ref(x), [x, ref.gate_proj.weight, ref.down_proj.weight, ref.up_proj.weight], grad_out
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)


def test_feed_forward_keeps_two_hidden_tensors_for_backward():
    # silu(w1 x) * w3 x keeps w1 x and w3 x only; plain autograd also keeps silu(w1 x).
    torch.manual_seed(0)
    frozen = lambda i, o: torch.nn.Linear(i, o, bias=False).requires_grad_(False)  # noqa: E731
    ff = FeedForward(frozen(40, 88), frozen(88, 40), frozen(40, 88))
    x = torch.randn(3, 7, 40, requires_grad=True)
    saved = {}

    def pack(t):
        if t.shape[-1] == 88 and t.dim() == 3:
            saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ff(x)
    assert len(saved) == 2
    a, b = ff.w1(x), ff.w3(x)
    want = torch.nn.functional.silu(a) * b
    torch.testing.assert_close(out, ff.w2(want), atol=0, rtol=0)
    (got_grad,) = torch.autograd.grad(out.sum(), x)
    (want_grad,) = torch.autograd.grad(ff.w2(want).sum(), x)
    torch.testing.assert_close(got_grad, want_grad, atol=0, rtol=0)


def _attention_pair(num_heads, num_kv_heads, dim=64, max_seq_len=64):
    cfg = tiny_hf_llama_config(
        hidden_size=dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_seq_len,
    )
    cfg._attn_implementation = "eager"
    ref = hf_llama.LlamaAttention(cfg, layer_idx=0).eval()
    head_dim = dim // num_heads
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
    ours = CausalSelfAttention(
        embed_dim=dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_proj=lin(dim, num_heads * head_dim),
        k_proj=lin(dim, num_kv_heads * head_dim),
        v_proj=lin(dim, num_kv_heads * head_dim),
        output_proj=lin(dim, dim),
        pos_embeddings=RotaryPositionalEmbeddings(head_dim, max_seq_len=max_seq_len),
        max_seq_len=max_seq_len,
    ).eval()
    # Our rotary layout is HF's: the weights load as they are.
    ours.load_state_dict(
        {
            "q_proj.weight": ref.q_proj.weight,
            "k_proj.weight": ref.k_proj.weight,
            "v_proj.weight": ref.v_proj.weight,
            "output_proj.weight": ref.o_proj.weight,
        }
    )
    return ref, ours, hf_llama.LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_attention_matches_hf_causal(num_heads, num_kv_heads):
    torch.manual_seed(0)
    ref, ours, rope_ref = _attention_pair(num_heads, num_kv_heads)
    b, s = 3, 19
    x = torch.randn(b, s, 64)
    pos = torch.arange(s).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
    with torch.no_grad():
        expected, _ = ref(x, position_embeddings=rope_ref(x, pos), attention_mask=_additive(causal))
        torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=RTOL)
        # An explicit causal bool mask is the same thing.
        torch.testing.assert_close(ours(x, mask=causal), expected, atol=ATOL, rtol=RTOL)


def _block_causal(rows):
    """Bool ``[b, s, s]`` mask and restarting positions for rows of document lengths."""
    s = sum(rows[0])
    mask = torch.zeros(len(rows), s, s, dtype=torch.bool)
    pos = torch.zeros(len(rows), s, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for n in row:
            mask[i, start : start + n, start : start + n] = torch.ones(n, n).tril().bool()
            pos[i, start : start + n] = torch.arange(n)
            start += n
    return mask, pos


def test_attention_matches_hf_with_mask_and_positions():
    """Block-causal mask + restarting positions (packing) against HF with the same mask."""
    torch.manual_seed(0)
    ref, ours, rope_ref = _attention_pair(4, 2)
    x = torch.randn(2, 12, 64)
    mask, pos = _block_causal([[5, 7], [3, 4, 5]])
    with torch.no_grad():
        expected, _ = ref(x, position_embeddings=rope_ref(x, pos), attention_mask=_additive(mask))
        torch.testing.assert_close(
            ours(x, mask=mask, input_pos=pos), expected, atol=ATOL, rtol=RTOL
        )


def test_attention_bad_heads_raise():
    lin = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="divisible"):
        CausalSelfAttention(8, 4, 3, 2, lin, lin, lin, lin, RotaryPositionalEmbeddings(2))


def test_decoder_layer_matches_hf():
    torch.manual_seed(0)
    cfg = tiny_hf_llama_config(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=88)
    cfg._attn_implementation = "eager"
    ref = hf_llama.LlamaDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        ref.input_layernorm.weight.normal_(1.0, 0.1)
        ref.post_attention_layernorm.weight.normal_(1.0, 0.1)
    _, attn, rope_ref = _attention_pair(4, 2)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
    ours = TransformerDecoderLayer(
        attn=attn,
        mlp=FeedForward(lin(64, 88), lin(88, 64), lin(64, 88)),
        sa_norm=RMSNorm(64, eps=1e-5),
        mlp_norm=RMSNorm(64, eps=1e-5),
    ).eval()
    ours.load_state_dict(
        {
            "sa_norm.scale": ref.input_layernorm.weight,
            "mlp_norm.scale": ref.post_attention_layernorm.weight,
            "attn.q_proj.weight": ref.self_attn.q_proj.weight,
            "attn.k_proj.weight": ref.self_attn.k_proj.weight,
            "attn.v_proj.weight": ref.self_attn.v_proj.weight,
            "attn.output_proj.weight": ref.self_attn.o_proj.weight,
            "mlp.w1.weight": ref.mlp.gate_proj.weight,
            "mlp.w2.weight": ref.mlp.down_proj.weight,
            "mlp.w3.weight": ref.mlp.up_proj.weight,
        }
    )
    b, s = 2, 23
    x = torch.randn(b, s, 64)
    pos = torch.arange(s).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
    with torch.no_grad():
        expected = ref(
            x,
            attention_mask=_additive(causal),
            position_ids=pos,
            position_embeddings=rope_ref(x, pos),
        )
        torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=RTOL)


def test_gqa_mask_free_and_masked_paths_agree_in_backward():
    """Mask-free causal GQA (SDPA shares kv heads) and the masked path (k/v expanded) agree."""
    torch.manual_seed(0)
    _, ours, _ = _attention_pair(8, 2)
    x = torch.randn(2, 13, 64, requires_grad=True)
    causal = torch.ones(13, 13, dtype=torch.bool).tril().expand(2, 13, 13)
    grads = []
    for mask in (None, causal):
        ours.zero_grad()
        x.grad = None
        (ours(x, mask=mask) ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in ours.parameters()])
    for g_free, g_masked in zip(*grads):
        torch.testing.assert_close(g_free, g_masked, atol=1e-5, rtol=1e-5)
