# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The per-component byte formulas of ``tune plan`` against what torch actually allocates."""

import weakref

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from torchtune import utils
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.training import LinearCrossEntropyLoss
from torchtune.training._memory_plan import (
    adamw_state_bytes,
    head_activation_bytes,
    layer_activation_bytes,
    layer_shape,
    nf4_bytes,
    tensor_bytes_by_dtype,
)
from torchtune.training._next_token_loss import next_token_loss_sum

# Odd sizes, grouped-query attention (3 heads, 1 kv head of 16).
_KW = dict(vocab_size=97, num_layers=3, num_heads=3, num_kv_heads=1, embed_dim=48,
           intermediate_dim=100, max_seq_len=128)  # fmt: skip
_CPU = torch.device("cpu")


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "full":
        return llama2(**_KW)
    model = lora_llama2(
        lora_attn_modules=["q_proj", "v_proj", "output_proj"] if kind == "lora" else ["k_proj"],
        apply_lora_to_mlp=kind == "lora",
        apply_lora_to_output=kind == "lora",
        lora_rank=4,
        lora_alpha=8,
        **_KW,
    )
    set_trainable_params(model, get_adapter_params(model))
    return model


def _batch(b: int, s: int, prompt: int):
    torch.manual_seed(1)
    tokens = torch.randint(0, _KW["vocab_size"], (b, s))
    labels = tokens.clone()
    labels[:, :prompt] = -100
    return {"tokens": tokens, "labels": labels}


def _predicted(model, n_tokens, n_scored, checkpointing=None, by_document=True):
    kept, rg = 0, model.tok_embeddings.weight.requires_grad
    for layer in model.layers:
        shape = layer_shape(layer)
        kept += layer_activation_bytes(shape, n_tokens, 4, rg, checkpointing, by_document)[0]
        rg = True  # every layer has trained weights here, so its output needs a gradient
    return kept + head_activation_bytes(model, n_tokens, n_scored, 4, num_chunks=4)["kept"]


def _saved_bytes(model, batch):
    """Bytes of the distinct non-parameter storages autograd saved for backward and still
    holds after forward (the loss's inner per-chunk graphs are gone by then)."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), [st.nbytes()]).append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = next_token_loss_sum(model, LinearCrossEntropyLoss(4), batch, _CPU)
    alive = [refs[0] for refs in seen.values() if any(r() is not None for r in refs[1:])]
    return sum(alive), loss


# (b, s, prompt): rows cut to one row of documents (b * (s - 1) tokens, b * (s - prompt)
# scored = the positions from the prompt's last token on), and too-short rows that stay a padded batch of b * s tokens.
@pytest.mark.parametrize("kind", ["full", "lora", "lora_k_only"])
@pytest.mark.parametrize("b,s,prompt,flat", [(2, 41, 5, True), (3, 9, 2, False)])
def test_saved_activations_match_saved_tensor_hooks(kind, b, s, prompt, flat):
    model = _model(kind)
    batch = _batch(b, s, prompt)
    n_tokens = b * (s - 1) if flat else b * s
    n_scored = b * (s - prompt)
    saved, _ = _saved_bytes(model, batch)
    assert saved == _predicted(model, n_tokens, n_scored, by_document=flat)


def _live_bytes_after_forward(model, batch):
    """Net bytes torch allocated during forward + loss and still holds (the profiler's
    allocation events): what is kept for backward, checkpointing's stash included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = next_token_loss_sum(model, LinearCrossEntropyLoss(4), batch, _CPU)
    return sum(e.self_cpu_memory_usage for e in prof.events()), loss


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", [None, "full", "selective"])
def test_checkpointed_activations_match_live_bytes(kind, checkpointing):
    model = _model(kind)
    setting = {None: False, "full": True, "selective": "selective"}[checkpointing]
    utils.apply_activation_checkpointing(model, setting)
    b, s, prompt = 2, 41, 5
    live, loss = _live_bytes_after_forward(model, _batch(b, s, prompt))
    predicted = _predicted(model, b * (s - 1), b * (s - prompt), checkpointing)
    # The loss scalars and checkpointing's bookkeeping are a few hundred bytes.
    assert abs(live - predicted) <= 1024, (live, predicted)


def test_adamw_state_matches_a_stepped_optimizer():
    model = _model("full")
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert state == adamw_state_bytes(params, fused=False, foreach=False)["state"]
    sizes = [p.numel() * 4 for p in params.values()]
    assert adamw_state_bytes(params, fused=True, foreach=False)["transient"] == 2 * max(sizes)
    assert adamw_state_bytes(params, fused=False, foreach=True)["transient"] == sum(sizes)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 48), (100, 352), (7, 64)])
def test_nf4_bytes_match_bitsandbytes(shape, double_quant):
    pytest.importorskip("bitsandbytes")
    from torchtune.modules.peft import quantize_nf4

    q = quantize_nf4(torch.randn(shape), double_quant=double_quant)
    stored = sum(t.numel() * t.element_size() for t in q.values())
    assert stored == nf4_bytes(*shape, double_quant=double_quant)


def test_tensor_bytes_by_dtype_counts_nf4_buffers():
    pytest.importorskip("bitsandbytes")
    with torch.device("meta"):
        model = lora_llama2(
            lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8, quantize_base=True, **_KW
        )
    by_dtype = tensor_bytes_by_dtype(model)
    d, h, kv = _KW["embed_dim"], _KW["intermediate_dim"], _KW["embed_dim"] // 3
    per_layer = 2 * nf4_bytes(d, d) + 2 * nf4_bytes(kv, d) + 2 * nf4_bytes(h, d)
    per_layer += nf4_bytes(d, h)
    assert by_dtype["uint8"] == _KW["num_layers"] * per_layer
