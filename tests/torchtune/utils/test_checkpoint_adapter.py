# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""LoRA adapter outputs: our adapter.safetensors, and PEFT's files that PeftModel loads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.torchtune.utils.checkpoint_fixtures import (
    ours_like,
    tiny_hf,
    write_hf_checkpoint,
    write_meta_checkpoint,
)
from torchtune.models.llama2 import (
    lora_llama2,
    peft_to_tune_adapter_weights,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.modules.peft import get_adapter_params, get_merged_lora_state_dict
from torchtune.utils import (
    FullModelHFCheckpointer,
    FullModelMetaCheckpointer,
    FullModelTorchTuneCheckpointer,
)

TOKENS = torch.tensor([[1, 17, 250, 3, 99, 320, 42, 7], [5, 0, 64, 128, 200, 11, 2, 300]])
RANK, ALPHA = 4, 8.0


def _lora_model(hf, base_sd, attn, mlp, output):
    c = hf.config
    model = lora_llama2(
        attn,
        apply_lora_to_mlp=mlp,
        apply_lora_to_output=output,
        vocab_size=c.vocab_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        embed_dim=c.hidden_size,
        max_seq_len=c.max_position_embeddings,
        intermediate_dim=c.intermediate_size,
        norm_eps=c.rms_norm_eps,
        lora_rank=RANK,
        lora_alpha=ALPHA,
    ).eval()
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.copy_(0.2 * torch.randn_like(p))  # lora_b starts at zero: make the adapter matter
    return model


def _save_lora(ckpt, model, attn, epoch=0):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter = {k: sd[k] for k in get_adapter_params(model)}
    targets = sorted({k.split(".")[-3] for k in adapter})  # "layers.0.attn.q_proj.lora_a.weight"
    config = {"r": RANK, "lora_alpha": ALPHA, "target_modules": targets}
    merged = get_merged_lora_state_dict(model, sd)
    state = {"model": merged, "adapter": adapter, "adapter_config": config}
    return ckpt.save_checkpoint(state, epoch=epoch), adapter, state["model"]


@pytest.mark.parametrize(
    "num_kv_heads,attn,mlp,output",
    [
        (2, ["q_proj", "k_proj", "v_proj", "output_proj"], True, True),
        (4, ["q_proj", "v_proj"], False, False),
        (2, ["k_proj", "output_proj"], True, False),
    ],
)
def test_peft_loads_our_adapter_with_same_logits(tmp_path, num_kv_heads, attn, mlp, output):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = tiny_hf(num_kv_heads, seed=4)
    names = write_hf_checkpoint(tmp_path / "in", hf)
    ckpt = FullModelHFCheckpointer(tmp_path / "in", names, "LLAMA2", tmp_path / "out")
    model = _lora_model(hf, ckpt.load_checkpoint()["model"], attn, mlp, output)
    with torch.no_grad():
        ours = model(TOKENS)
    out, adapter, merged_sd = _save_lora(ckpt, model, attn)

    peft_dir = out.parent / "epoch_0_peft"
    peft_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert peft_config["r"] == RANK and peft_config["lora_alpha"] == ALPHA
    assert peft_config["base_model_name_or_path"] == str((tmp_path / "in").resolve())
    # hf holds the unmerged base weights.
    peft_model = PeftModel.from_pretrained(hf, peft_dir).eval()
    with torch.no_grad():
        theirs = peft_model(TOKENS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # Every adapter tensor is in PEFT's file, so none was left at its init.
    assert len(load_file(str(peft_dir / "adapter_model.safetensors"))) == len(adapter)

    # The merged model in the epoch folder is what from_pretrained sees, adapter not re-applied.
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    ours_merged = ours_like(hf)
    ours_merged.load_state_dict(merged_sd)
    with torch.no_grad():
        theirs = merged(TOKENS).logits
        torch.testing.assert_close(theirs, ours_merged(TOKENS), rtol=1e-5, atol=1e-5)
    # Folding B @ A into W rounds differently from applying it on the side.
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    # Both adapter files load back into our keys, bit for bit.
    for name in ("epoch_0_adapter/adapter.safetensors", "epoch_0_peft/adapter_model.safetensors"):
        back = FullModelHFCheckpointer(
            out, names, "LLAMA2", tmp_path / "o2", adapter_checkpoint=out.parent / name
        ).load_checkpoint()["adapter"]
        assert sorted(back) == sorted(adapter)
        for k in adapter:
            assert torch.equal(back[k], adapter[k]), (name, k)


def test_adapter_key_and_config_maps():
    adapter = {
        "layers.1.attn.q_proj.lora_b.weight": torch.randn(64, 4),
        "layers.1.attn.k_proj.lora_b.weight": torch.randn(32, 4),
        "layers.1.attn.k_proj.lora_a.weight": torch.randn(4, 64),
        "layers.0.mlp.w2.lora_a.weight": torch.randn(4, 88),
        "output.lora_b.weight": torch.randn(321, 4),
    }
    peft = tune_to_peft_adapter_weights(adapter)
    assert sorted(peft) == sorted(
        [
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight",
            "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
            "base_model.model.lm_head.lora_B.weight",
        ]
    )
    # Same rotary layout as HF: a pure rename, every tensor the very same object.
    k_b = peft["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert k_b is adapter["layers.1.attn.k_proj.lora_b.weight"]
    lm_head_b = peft["base_model.model.lm_head.lora_B.weight"]
    assert lm_head_b is adapter["output.lora_b.weight"]
    back = peft_to_tune_adapter_weights(peft)
    assert sorted(back) == sorted(adapter)
    assert all(torch.equal(back[k], adapter[k]) for k in adapter)

    targets = ["q_proj", "output_proj", "mlp", "output"]
    cfg = tune_to_peft_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": targets})
    expected = ["q_proj", "o_proj", "gate_proj", "down_proj", "up_proj", "lm_head"]
    assert cfg["target_modules"] == expected
    with pytest.raises(ValueError, match="Unknown LoRA target module 'o_projj'"):
        tune_to_peft_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": ["o_projj"]})
    with pytest.raises(ValueError, match=r"lacks \['lora_alpha'\]"):
        tune_to_peft_adapter_config({"r": 4, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="Unexpected key 'layers.0.attn.q_proj.weight'"):
        tune_to_peft_adapter_weights({"layers.0.attn.q_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Unexpected key 'model.layers.0.q_proj.lora_A.weight'"):
        peft_to_tune_adapter_weights({"model.layers.0.q_proj.lora_A.weight": torch.zeros(1)})


def test_meta_and_native_write_adapter_files(tmp_path):
    from peft import PeftModel

    hf = tiny_hf(2, seed=5)
    name = write_meta_checkpoint(tmp_path / "meta", hf)
    meta = FullModelMetaCheckpointer(tmp_path / "meta", [name], "LLAMA2", tmp_path / "out_meta")
    base = meta.load_checkpoint()["model"]
    model = _lora_model(hf, base, ["q_proj", "k_proj"], False, False)
    with torch.no_grad():
        ours = model(TOKENS)
    out, adapter, _ = _save_lora(meta, model, ["q_proj", "k_proj"])
    assert {p.name for p in out.iterdir()} == {name, "params.json"}
    peft_dir = out.parent / "epoch_0_peft"
    peft_files = {p.name for p in peft_dir.iterdir()}
    assert peft_files == {"adapter_model.safetensors", "adapter_config.json"}
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, peft_dir).eval()(TOKENS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # Native format, no config.json or params.json nearby: PEFT's files are a rename of ours,
    # so they are written too (no base model path to name).
    torch.save(base, tmp_path / "native.pt")
    native = FullModelTorchTuneCheckpointer(
        tmp_path, ["native.pt"], "LLAMA2", tmp_path / "out_native"
    )
    native.load_checkpoint()
    out, adapter, _ = _save_lora(native, model, ["q_proj", "k_proj"])
    assert {p.name for p in out.iterdir()} == {"native.pt"}
    loaded = load_file(str(out.parent / "epoch_0_adapter" / "adapter.safetensors"))
    assert all(torch.equal(loaded[k], adapter[k]) for k in adapter)
    peft_config = json.loads((out.parent / "epoch_0_peft" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] is None
    fresh = tiny_hf(2, seed=5)  # from_pretrained modified hf in place
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(fresh, out.parent / "epoch_0_peft").eval()(TOKENS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # And its PEFT adapter loads back into our keys, bit for bit.
    back = FullModelTorchTuneCheckpointer(
        out,
        ["native.pt"],
        "LLAMA2",
        tmp_path / "o3",
        adapter_checkpoint=out.parent / "epoch_0_peft",
    ).load_checkpoint()["adapter"]
    assert sorted(back) == sorted(adapter) and all(
        torch.equal(back[k], adapter[k]) for k in adapter
    )


def test_why_peft_files_are_not_beside_merged_weights(tmp_path):
    """transformers applies an adapter_config.json found next to a full model: with merged
    weights that doubles the adapter. Guards the choice of the sibling ``NAME_peft/`` folder."""
    import shutil

    from transformers import AutoModelForCausalLM

    hf = tiny_hf(2, seed=6)
    names = write_hf_checkpoint(tmp_path / "in", hf)
    ckpt = FullModelHFCheckpointer(tmp_path / "in", names, "LLAMA2", tmp_path / "out")
    model = _lora_model(hf, ckpt.load_checkpoint()["model"], ["q_proj", "v_proj"], False, False)
    with torch.no_grad():
        ours = model(TOKENS)
    out, _, _ = _save_lora(ckpt, model, ["q_proj", "v_proj"])
    for f in (out.parent / "epoch_0_peft").iterdir():
        shutil.copy(f, out / f.name)
    doubled = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert (doubled(TOKENS).logits - ours).abs().max() > 1e-2


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_adapter_saved_by_peft_loads_into_our_lora_model(tmp_path, num_kv_heads):
    from peft import LoraConfig, get_peft_model

    hf = tiny_hf(num_kv_heads, seed=7)
    names = write_hf_checkpoint(tmp_path / "base", hf)
    targets = ["q_proj", "k_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]
    peft_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets)
    peft_model = get_peft_model(hf, peft_cfg).eval()
    torch.manual_seed(8)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn_like(p))
        theirs = peft_model(TOKENS).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ckpt = FullModelHFCheckpointer(
        tmp_path / "base",
        names,
        "LLAMA2",
        tmp_path / "out",
        adapter_checkpoint=tmp_path / "peft" / "adapter_model.safetensors",
    ).load_checkpoint()
    model = _lora_model(hf, ckpt["model"], ["q_proj", "k_proj", "output_proj"], True, False)
    missing, unexpected = model.load_state_dict(ckpt["adapter"], strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), theirs, rtol=1e-5, atol=1e-5)


def test_adapter_checkpoint_may_be_a_peft_folder(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = tiny_hf(2, seed=7)
    names = write_hf_checkpoint(tmp_path / "base", hf)
    peft_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(hf, peft_cfg).eval()
    torch.manual_seed(9)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")

    def load(adapter_checkpoint):
        return FullModelHFCheckpointer(
            tmp_path / "base",
            names,
            "LLAMA2",
            tmp_path / "out",
            adapter_checkpoint=adapter_checkpoint,
        ).load_checkpoint()["adapter"]

    from_folder = load(tmp_path / "peft")
    from_file = load(tmp_path / "peft" / "adapter_model.safetensors")
    assert (
        set(from_folder) == set(from_file) and len(from_folder) == 4 * hf.config.num_hidden_layers
    )
    for k in from_file:
        torch.testing.assert_close(from_folder[k], from_file[k], rtol=0, atol=0)
    (tmp_path / "peft" / "adapter_config.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"peft is a folder but lacks \['adapter_config.json'\]"
    ):
        load(tmp_path / "peft")
