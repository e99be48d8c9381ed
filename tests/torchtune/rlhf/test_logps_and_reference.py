# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""sequence_logps against a transformers forward of the padded pair batch; the reference
policies (adapters off, a frozen adapter swapped in) against plain and PEFT models."""

import pytest
import torch
import torch.nn.functional as F

from tests.test_utils import tiny_hf_llama
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_pairs
from torchtune.models.llama2 import hf_to_tune, lora_llama2
from torchtune.modules.peft import get_adapter_params, init_lora_adapters
from torchtune.rlhf import adapter_swapped, adapters_disabled, sequence_logps

VOCAB = 301
SIZES = dict(vocab_size=VOCAB, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64)
SIZES.update(intermediate_dim=88, max_seq_len=256)
IGNORE = CROSS_ENTROPY_IGNORE_IDX


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_llama(seed=0, vocab_size=VOCAB)


def _lora(hf, seed=0):
    model = lora_llama2(
        ["q_proj", "v_proj", "output_proj"], True, False, lora_rank=4, lora_alpha=8, **SIZES
    )
    model.load_state_dict(hf_to_tune(hf.state_dict()), strict=False)
    adapter = init_lora_adapters(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    adapter = {  # non-zero B, so the adapter changes the output
        k: (0.05 * torch.randn(v.shape, generator=g) if "lora_b" in k else v)
        for k, v in adapter.items()
    }
    model.load_state_dict(adapter, strict=False)
    return model.eval(), adapter


def _pairs(n_pairs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_pairs):
        n_prompt = int(torch.randint(3, 9, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (n_prompt,), generator=g).tolist()
        sample = {}
        for side in ("chosen", "rejected"):
            n = int(torch.randint(1, 12, (1,), generator=g))
            answer = torch.randint(3, VOCAB, (n,), generator=g).tolist()
            sample[f"{side}_tokens"] = prompt + answer
            sample[f"{side}_labels"] = [IGNORE] * n_prompt + answer
        samples.append(sample)
    return padded_collate_pairs(samples, padding_idx=0)


def _hf_logps(hf_model, batch):
    logits = hf_model(input_ids=batch["tokens"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE
    token_logps = torch.gather(
        F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)
    ).squeeze(-1)
    return (token_logps * scored).sum(1), scored.sum(1)


def _awkward_pairs():
    """Pairs whose shared prefix is cut by every rule: a prompt, none (the rows differ at
    token 0), a chosen row that is a prefix of its rejected one, identical rows, and scored
    prompt tokens (``train_on_input``) inside the shared prefix."""
    g = torch.Generator().manual_seed(5)

    def toks(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    prompt, a, b = toks(6), toks(5), toks(4)
    samples = [
        ((prompt, a), (prompt, b)),
        (([7] + a, None), ([8] + b, None)),
        ((prompt, a), (prompt, a + b)),
        ((prompt, a), (prompt, a)),
    ]
    out = []
    for (cp, ca), (rp, ra) in samples:
        sample = {}
        for side, (p_, a_) in (("chosen", (cp, ca)), ("rejected", (rp, ra))):
            if a_ is None:  # everything scored
                sample[f"{side}_tokens"], sample[f"{side}_labels"] = p_, list(p_)
            else:
                sample[f"{side}_tokens"] = p_ + a_
                sample[f"{side}_labels"] = [IGNORE] * len(p_) + a_
        out.append(sample)
    # train_on_input: the prompt's tokens are scored in both rows
    full = {"chosen_tokens": prompt + a, "rejected_tokens": prompt + b}
    full["chosen_labels"], full["rejected_labels"] = list(prompt + a), list(prompt + b)
    out.append(full)
    return padded_collate_pairs(out, padding_idx=0)


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("make_batch", [_pairs, _awkward_pairs])
def test_sequence_logps_match_transformers(hf, pairs, make_batch):
    from torchtune.models.llama2 import llama2

    ours = llama2(**SIZES)
    ours.load_state_dict(hf_to_tune(hf.state_dict()))
    batch = make_batch()
    expected, lengths = _hf_logps(hf, batch)
    with torch.no_grad():
        logps, our_lengths = sequence_logps(ours.eval(), batch, torch.device("cpu"), pairs=pairs)
    torch.testing.assert_close(logps, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(our_lengths, lengths, rtol=0, atol=0)


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("make_batch", [lambda: _pairs(seed=1), _awkward_pairs])
def test_sequence_logps_gradients_match_transformers(hf, pairs, make_batch):
    from torchtune.models.llama2 import llama2

    ours = llama2(**SIZES)
    ours.load_state_dict(hf_to_tune(hf.state_dict()))
    batch = make_batch()
    weights = torch.linspace(-1, 1, batch["tokens"].shape[0])
    logps = sequence_logps(ours, batch, torch.device("cpu"), pairs=pairs)[0]
    (logps * weights).sum().backward()
    hf.zero_grad()
    (_hf_logps(hf, batch)[0] * weights).sum().backward()
    hf_grads = hf_to_tune({k: p.grad for k, p in hf.named_parameters()})
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[k], rtol=1e-4, atol=2e-5, msg=k)
    hf.zero_grad()


def test_adapters_disabled_is_the_base_model(hf):
    model, _ = _lora(hf)
    batch = _pairs(seed=2)
    base, _ = _hf_logps(hf, batch)
    with torch.no_grad():
        with adapters_disabled(model):
            off, _ = sequence_logps(model, batch, torch.device("cpu"))
        on, _ = sequence_logps(model, batch, torch.device("cpu"))
    torch.testing.assert_close(off, base, rtol=0, atol=2e-5)
    assert (on - base).abs().max() > 1e-3  # the adapter is back on after the block


@pytest.mark.parametrize(
    "use_dora,quantize_base",
    [(True, False), (False, True), (True, True)],
    ids=["dora", "qlora", "qdora"],
)
def test_adapters_disabled_is_the_base_model_under_dora_and_qlora(hf, use_dora, quantize_base):
    """Adapters off is the base layer exactly: on the NF4 weight (``weight`` is None there)
    and without DoRA's magnitude, here moved off ``||W||`` as training would move it."""
    from torchtune.models.llama2 import llama2

    model = lora_llama2(
        ["q_proj", "v_proj", "output_proj"],
        True,
        False,
        lora_rank=4,
        lora_alpha=8,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **SIZES,
    )
    model.load_state_dict(hf_to_tune(hf.state_dict()), strict=False)
    g = torch.Generator().manual_seed(5)
    adapter = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if "lora_a" not in k else v
        for k, v in init_lora_adapters(model, seed=0).items()
    }
    model.load_state_dict(adapter, strict=False)
    base = llama2(**SIZES).eval()  # the base model on the weights as the LoRA model holds them
    base.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "lora_" not in k and "magnitude" not in k}
    )
    tokens = _pairs(seed=4)["tokens"]
    with torch.no_grad():
        want = base(tokens)
        with adapters_disabled(model.eval()):
            off = model(tokens)
        on = model(tokens)
    torch.testing.assert_close(off, want, rtol=1e-5, atol=1e-5)
    assert (on - want).abs().max() > 1e-3  # the adapter (and magnitude) is back on after
    assert not any(m.disabled for m in model.modules() if hasattr(m, "disabled"))


def test_adapter_swapped_matches_peft_with_that_adapter(hf, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, start = _lora(hf, seed=0)
    params = get_adapter_params(model)
    with torch.no_grad():  # training moved the live adapter away from the start
        for p in params.values():
            p.add_(0.03)
    frozen = {k: v.clone() for k, v in start.items()}
    batch = _pairs(seed=3)
    with torch.no_grad():
        with adapter_swapped(model, frozen, params):
            ref, _ = sequence_logps(model, batch, torch.device("cpu"))
        live, _ = sequence_logps(model, batch, torch.device("cpu"))
    assert all(not torch.equal(p, frozen[k]) for k, p in params.items())  # restored

    from torchtune.models.llama2 import tune_to_peft_adapter_weights

    peft_model = get_peft_model(
        tiny_hf_llama(seed=0, vocab_size=VOCAB),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj"] + ["gate_proj", "up_proj", "down_proj"],
        ),
    )
    peft_sd = tune_to_peft_adapter_weights(frozen)
    missing = peft_model.load_state_dict(
        {k.replace(".weight", ".default.weight"): v for k, v in peft_sd.items()}, strict=False
    )
    assert not missing.unexpected_keys
    expected, _ = _hf_logps(peft_model.eval(), batch)
    torch.testing.assert_close(ref, expected, rtol=0, atol=2e-5)
    assert (live - expected).abs().max() > 1e-3


def test_reference_helpers_refuse_a_mismatch(hf):
    from torchtune.models.llama2 import llama2

    with pytest.raises(ValueError, match="has no LoRA modules"):
        with adapters_disabled(llama2(**SIZES)):
            pass
    model, start = _lora(hf)
    params = get_adapter_params(model)
    short = dict(list(start.items())[1:])
    with pytest.raises(ValueError, match=r"missing \['layers.0"):
        with adapter_swapped(model, short, params):
            pass
