# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""NF4 storage (QLoRA's base weights): against bitsandbytes' own round trip and a plain-PyTorch
NF4 from the paper's 16 code values; quantized layers against plain ones on the dequantized
weights; what a QLoRA model stores."""

import pytest
import torch

from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules.peft import (
    LoRALinear,
    NF4Linear,
    NF4Weight,
    dequantize_nf4,
    get_merged_lora_state_dict,
    init_lora_adapters,
    quantize_nf4,
)

bnb_f = pytest.importorskip("bitsandbytes.functional")

# QLoRA's NF4 code values (Dettmers et al. 2023, appendix E), as the paper prints them.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
SHAPES = [(37, 53), (64, 64), (96, 40), (5, 3)]  # odd sizes: blocks cross rows, a short tail
# Past 256 blocks, double quantization has whole blocks of scales: 500 (one whole and a
# partial one) and 1024 (exactly four).
MANY_BLOCKS = [(160, 200), (128, 512)]


def _weight(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


def _plain_nf4(w: torch.Tensor):
    """Blocks of 64 (row-major, the last one short), each scaled by its absmax and rounded to
    the nearest code value. Returns ``(dequantized [shape] fp32, normalised values [n],
    absmax per element [n])``."""
    flat = w.float().reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % 64)).view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    normed = (blocks / absmax).reshape(-1)[:n]
    idx = (normed[:, None] - NF4_CODE[None]).abs().argmin(dim=1)
    per_elem = absmax.expand(-1, 64).reshape(-1)[:n]
    return (NF4_CODE[idx] * per_elem).view(w.shape), normed, per_elem


@pytest.mark.parametrize("shape", SHAPES + MANY_BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantized_weight_is_bitsandbytes_round_trip(shape, dtype, double_quant):
    w = _weight(shape, dtype)
    q, state = bnb_f.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    want = bnb_f.dequantize_4bit(q, state)
    got = dequantize_nf4(quantize_nf4(w, double_quant), shape, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    nf4 = NF4Weight(shape[0], shape[1], double_quant).to(dtype)
    nf4.quantize_(w)
    torch.testing.assert_close(nf4.dequantize(), want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantized_weight_matches_plain_nf4_from_the_paper(shape, double_quant):
    """Same code for every element except those within 1e-4 of a decision boundary (the
    midpoints between code values, where fp32 rounding may pick either side); values equal up
    to bitsandbytes' fp32 code values (<= 1e-6 relative to the block's absmax) plus, with double
    quantization, the error of the 8-bit block scales: at most half the largest gap of the
    dynamic 8-bit map times the largest ``|absmax - mean(absmax)|`` of the 256-scale block,
    for a code value of magnitude <= 1."""
    w = _weight(shape, torch.float32, seed=1)
    want, normed, absmax = _plain_nf4(w)
    got = NF4Weight(*shape, double_quant=double_quant)
    got.quantize_(w)
    got = got.dequantize().reshape(-1)
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    near_boundary = (normed[:, None] - mids[None]).abs().min(dim=1).values < 1e-4
    bound = 1e-6 * absmax
    if double_quant:
        max_gap = bnb_f.create_dynamic_map(signed=True).sort().values.diff().max()
        scales = absmax[::64]  # one per block of 64 elements
        centred = scales - scales.mean()  # what the 8-bit codes store, by blocks of 256
        n_blocks = scales.numel()
        pad = torch.nn.functional.pad(centred.abs(), (0, -n_blocks % 256)).view(-1, 256)
        block_max = pad.amax(dim=1).repeat_interleave(256)[:n_blocks]
        scale_err = 0.5 * max_gap * block_max
        bound = bound + scale_err.repeat_interleave(64)[: absmax.numel()]
    keep = ~near_boundary
    assert keep.float().mean() > 0.99
    err = (got - want.reshape(-1)).abs()
    assert bool((err[keep] <= bound[keep]).all()), float((err - bound)[keep].max())


def test_quantized_linear_is_the_plain_linear_on_dequantized_weights():
    torch.manual_seed(0)
    plain = torch.nn.Linear(53, 37, bias=True)
    quant = NF4Linear(53, 37, use_bias=True)
    missing, unexpected = quant.load_state_dict(plain.state_dict())  # strict: same keys
    assert not missing and not unexpected
    deq = quant.state_dict()
    assert list(deq) == ["weight", "bias"]
    q, state = bnb_f.quantize_4bit(
        plain.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    torch.testing.assert_close(deq["weight"], bnb_f.dequantize_4bit(q, state), rtol=0, atol=0)
    ref = torch.nn.Linear(53, 37, bias=True)
    ref.load_state_dict(deq)
    x = torch.randn(4, 7, 53, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(4, 7, 37)
    out, out_ref = quant(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_scales_survive_a_dtype_cast_and_bad_shapes_are_refused():
    nf4 = NF4Weight(37, 53, double_quant=False)
    nf4.quantize_(_weight((37, 53), torch.float32))
    before = {k: v.clone() for k, v in nf4.named_buffers() if k != "dtype_probe"}
    nf4 = nf4.to(torch.bfloat16)
    assert nf4.dtype == torch.bfloat16
    for k, v in nf4.named_buffers():
        if k != "dtype_probe":
            assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match=r"\(37, 53\) got \(53, 37\)"):
        nf4.quantize_(torch.zeros(53, 37))
    layer = NF4Linear(53, 37)
    with pytest.raises(RuntimeError, match="weight"):
        layer.load_state_dict({"weight": torch.zeros(53, 37)})
    _, _ = layer.load_state_dict({}, strict=False)
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        layer.load_state_dict({})


SHAPE = dict(
    vocab_size=97,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=48,
    max_seq_len=32,
    intermediate_dim=72,
)


def _qlora(use_dora=False, device=None, **kw):
    with torch.device(device or "cpu"):
        return lora_llama2(
            ["q_proj", "v_proj"],
            apply_lora_to_output=True,
            lora_rank=4,
            lora_alpha=8.0,
            use_dora=use_dora,
            **SHAPE,
            **kw,
        )


def test_qlora_model_keeps_decoder_linears_in_nf4_and_the_rest_in_model_dtype():
    model = _qlora(quantize_base=True)
    for name, m in model.named_modules():
        if name.startswith("layers.") and isinstance(m, (torch.nn.Linear, LoRALinear)):
            if name.endswith(("lora_a", "lora_b")):
                continue
            assert isinstance(m, NF4Linear) or m.quantize_base, name
    assert not model.output.quantize_base  # adapted, not quantized
    assert type(model.tok_embeddings) is torch.nn.Embedding
    # No full-precision copy of a decoder linear weight anywhere: the layers hold floats only
    # for norms, RoPE tables and adapters, and 4.13 bits a weight for the linears.
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if n.startswith("layers.") and t.is_floating_point() and t.dim() == 2:
            assert "lora_" in n or "pos_embeddings" in n, n
    for n, p in llama2(**SHAPE).named_parameters():
        if n.startswith("layers.") and n.endswith(".weight") and p.dim() == 2:
            nf4 = model.get_submodule(n[: -len(".weight")]).weight_nf4
            nbytes = sum(b.numel() for name, b in nf4.named_buffers() if name != "dtype_probe")
            # codes, 8-bit scales, fp32 scales of those, the offset, the 256-value map
            numel, blocks = p.numel(), -(-p.numel() // 64)
            assert nbytes == -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4 + 1024, n
    # The state dict is the LoRA model's, so base checkpoints and merged exports are too.
    assert model.state_dict().keys() == _qlora().state_dict().keys()


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_equals_lora_on_the_dequantized_weights(use_dora):
    torch.manual_seed(0)
    base = llama2(**SHAPE).state_dict()
    qlora = _qlora(use_dora, quantize_base=True)
    qlora.load_state_dict(base, strict=False)
    qlora.load_state_dict(init_lora_adapters(qlora, seed=0), strict=False)
    with torch.no_grad():  # a trained-looking adapter
        for n, p in qlora.named_parameters():
            if n.endswith("lora_b.weight"):
                p.normal_(std=0.1)
    lora = _qlora(use_dora)
    lora.load_state_dict(qlora.state_dict())  # the dequantized weights and the same adapter
    tokens = torch.randint(0, 97, (2, 11))
    out_q, out_l = qlora(tokens), lora(tokens)
    torch.testing.assert_close(out_q, out_l, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_q)
    names = [n for n, p in qlora.named_parameters() if "lora_" in n or "magnitude" in n]
    grads_q = torch.autograd.grad((out_q * g).sum(), [qlora.get_parameter(n) for n in names])
    grads_l = torch.autograd.grad((out_l * g).sum(), [lora.get_parameter(n) for n in names])
    for n, a, b in zip(names, grads_q, grads_l):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    # Merged export: dequantized, the LoRA model's merge.
    merged_q, merged_l = get_merged_lora_state_dict(qlora), get_merged_lora_state_dict(lora)
    assert merged_q.keys() == merged_l.keys()
    for k in merged_q:
        torch.testing.assert_close(merged_q[k], merged_l[k], rtol=0, atol=0, msg=k)


def test_qdora_magnitude_is_the_dequantized_base_norm_on_one_device_and_n_ranks():
    torch.manual_seed(0)
    base = llama2(**SHAPE).state_dict()
    loaded = _qlora(True, quantize_base=True)
    loaded.load_state_dict(base, strict=False)
    fresh = init_lora_adapters(loaded, seed=0)
    key = "layers.1.attn.q_proj."
    deq = loaded.state_dict()[key + "weight"]
    torch.testing.assert_close(fresh[key + "magnitude"], torch.linalg.norm(deq, dim=1))
    meta = _qlora(True, device="meta", quantize_base=True)
    from_sd = init_lora_adapters(meta, seed=0, base_state_dict=base)
    for k in fresh:
        torch.testing.assert_close(from_sd[k], fresh[k], rtol=0, atol=0, msg=k)


def test_quantize_double_false_keeps_fp32_scales():
    model = _qlora(quantize_base=True, quantize_double=False)
    q = model.layers[0].attn.q_proj.weight_nf4
    assert not q.double_quant and not hasattr(q, "absmax_scale")
    torch.manual_seed(0)
    base = llama2(**SHAPE).state_dict()
    model.load_state_dict(base, strict=False)
    w = base["layers.0.attn.k_proj.weight"]
    qw, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    torch.testing.assert_close(
        model.state_dict()["layers.0.attn.k_proj.weight"],
        bnb_f.dequantize_4bit(qw, state),
        rtol=0,
        atol=0,
    )
