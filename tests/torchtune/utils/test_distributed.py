# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""torchtune.utils._distributed on 2 CPU processes (gloo), against the unsharded model."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchtune import utils
from torchtune.models.llama2 import lora_llama2
from torchtune.modules import TransformerDecoderLayer
from torchtune.modules.peft import get_adapter_params, set_trainable_params

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_lora(device: str = "cpu") -> torch.nn.Module:
    with torch.device(device):
        return lora_llama2(
            ["q_proj", "v_proj"],
            vocab_size=101,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            embed_dim=32,
            max_seq_len=64,
            intermediate_dim=40,
            lora_rank=4,
            lora_alpha=8,
        )


def _sharded(param_dtype=None) -> torch.nn.Module:
    model = _tiny_lora("meta")
    utils.shard_model(
        model, torch.device("cpu"), layer_types=(TransformerDecoderLayer,), param_dtype=param_dtype
    )
    return model.to_empty(device="cpu")


def _rank_env(rank: int, port: int) -> None:
    """What torchrun would set for ``rank`` of a local gloo group on ``port``; one thread."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _worker(rank: int, port: int, ref_path: str) -> None:
    _rank_env(rank, port)
    assert utils.init_distributed(torch.device("cpu")) == (WORLD_SIZE, rank)
    assert utils.get_world_size_and_rank() == (WORLD_SIZE, rank)
    ref_sd, tokens, ref_grads, ref_after_step, ref_osd = torch.load(ref_path, weights_only=True)

    # Only rank 0 holds the checkpoint; every rank ends up with exactly its shard of it.
    model = _sharded()
    utils.load_from_full_state_dict(model, dict(ref_sd) if rank == 0 else None)
    for name, p in model.named_parameters():
        assert p.to_local().numel() < p.numel() or p.shape[0] < WORLD_SIZE, name
    full = utils.gather_full_state_dict(model)
    if rank == 0:
        assert full.keys() == ref_sd.keys()
        for k, v in ref_sd.items():
            torch.testing.assert_close(full[k], v, rtol=0, atol=0, msg=k)
    else:
        assert full == {}

    # Loss over this rank's rows, divided by the global count and times W: FSDP's mean over
    # ranks then gives the single-process gradient of the whole batch.
    adapters = get_adapter_params(model)
    set_trainable_params(model, adapters)
    opt = torch.optim.AdamW(adapters.values(), lr=1e-2)
    logits = model(tokens[rank::WORLD_SIZE])
    (logits.float().pow(2).sum() / tokens.numel() * WORLD_SIZE).backward()
    for name, p in adapters.items():
        torch.testing.assert_close(p.grad.full_tensor(), ref_grads[name], rtol=1e-5, atol=1e-7)
    opt.step()
    for name, p in adapters.items():
        torch.testing.assert_close(p.full_tensor(), ref_after_step[name], rtol=1e-5, atol=1e-7)

    # The gathered optimizer state is laid out as the unsharded optimizer.state_dict()...
    opt.param_groups[0]["initial_lr"] = 5e-3  # what an lr scheduler adds
    osd = utils.gather_optimizer_state_dict(model, opt)
    if rank == 0:
        assert osd["param_groups"][0]["params"] == ref_osd["param_groups"][0]["params"]
        assert osd["state"].keys() == ref_osd["state"].keys()
        for i, state in ref_osd["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(osd["state"][i][key], value, rtol=1e-5, atol=1e-7)
    else:
        assert osd == {}
    # ... so the single-device one loads into a fresh sharded optimizer, on every rank.
    opt.zero_grad(set_to_none=True)  # as in a freshly set-up recipe
    opt2 = torch.optim.AdamW(adapters.values(), lr=1e-2)
    ref_osd["param_groups"][0]["initial_lr"] = 5e-3
    utils.load_optimizer_state_dict(model, opt2, ref_osd if rank == 0 else None)
    for p in adapters.values():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt2.state[p][key].full_tensor(), opt.state[p][key].full_tensor()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert int(opt2.state[p]["step"]) == 1
    assert opt2.param_groups[0]["initial_lr"] == 5e-3  # on every rank, not only rank 0
    bad = torch.optim.AdamW([*adapters.values()][1:], lr=1e-2)
    with pytest.raises(ValueError, match="parameters per group: saved \\[8\\], optimizer \\[7\\]"):
        utils.load_optimizer_state_dict(model, bad, ref_osd if rank == 0 else None)

    # A checkpoint that does not fit raises on every rank (none is left waiting).
    bad = dict(ref_sd)
    bad.pop("norm.scale")
    with pytest.raises(ValueError, match=r"missing \['norm.scale'\]"):
        utils.load_from_full_state_dict(_sharded(), bad if rank == 0 else None)

    # bf16 compute keeps fp32 sharded masters, also from a bf16 checkpoint (as Llama2's HF
    # weights come); gradients track the fp32 ones.
    model16 = _sharded(param_dtype=torch.bfloat16)
    sd16 = {k: v.bfloat16() for k, v in ref_sd.items()}
    utils.load_from_full_state_dict(model16, dict(sd16) if rank == 0 else None)
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    full16 = utils.gather_full_state_dict(model16)
    for k, v in full16.items():
        torch.testing.assert_close(v, sd16[k].float(), rtol=0, atol=0, msg=k)
    logits16 = model16(tokens[rank::WORLD_SIZE])
    assert logits16.dtype == torch.bfloat16
    (logits16.float().pow(2).sum() / tokens.numel() * WORLD_SIZE).backward()
    g16 = model16.tok_embeddings.weight.grad
    assert g16.dtype == torch.float32
    ref_g = ref_grads["tok_embeddings.weight"]
    assert (g16.full_tensor() - ref_g).norm() < 0.05 * ref_g.norm()

    assert utils.broadcast_object({"step": rank}) == {"step": 0}
    assert utils.all_reduce_sum([rank, 1.5], torch.device("cpu")).tolist() == [1.0, 3.0]
    dist.destroy_process_group()


def test_sharded_load_gather_gradients_and_optimizer_state_on_two_processes(tmp_path):
    torch.manual_seed(0)
    ref = _tiny_lora()
    for p in get_adapter_params(ref).values():  # nonzero B: LoRA gradients are nonzero
        torch.nn.init.normal_(p, std=0.1)
    ref_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    tokens = torch.randint(0, 101, (4, 9))
    adapters = get_adapter_params(ref)
    set_trainable_params(ref, adapters)
    (ref(tokens).pow(2).sum() / tokens.numel()).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    ref_grads["tok_embeddings.weight"] = torch.func.grad(
        lambda w: (
            torch.func.functional_call(ref, {"tok_embeddings.weight": w}, (tokens,)).pow(2).sum()
            / tokens.numel()
        )
    )(ref.tok_embeddings.weight.detach())
    opt = torch.optim.AdamW(adapters.values(), lr=1e-2)
    opt.step()
    after = {n: p.detach().clone() for n, p in adapters.items()}
    path = tmp_path / "ref.pt"
    torch.save((ref_sd, tokens, ref_grads, after, opt.state_dict()), path)
    mp.start_processes(
        _worker, args=(_free_port(), str(path)), nprocs=WORLD_SIZE, start_method="spawn"
    )


def test_outside_a_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert utils.get_world_size_and_rank() == (1, 0)
    assert not utils.is_distributed()
    with pytest.raises(ValueError, match=r"'RANK', 'WORLD_SIZE'.*--nproc_per_node"):
        utils.init_distributed(torch.device("cpu"))


def test_record_rank_on_failure_names_the_rank(monkeypatch):
    monkeypatch.setenv("RANK", "3")

    @utils.record_rank_on_failure
    def main(x):
        if x:
            raise KeyError("boom")
        return 7

    assert main(0) == 7
    with pytest.raises(RuntimeError, match=r"^rank 3: KeyError: 'boom'") as info:
        main(1)
    assert isinstance(info.value.__cause__, KeyError)
    monkeypatch.delenv("RANK")
    with pytest.raises(KeyError):  # not under torchrun: unchanged
        main(1)


def _peak_rss_mib_since_reset() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")


def _memory_worker(rank: int, port: int, out_dir: str) -> None:
    _rank_env(rank, port)
    utils.init_distributed(torch.device("cpu"))
    layers = 16
    build = dict(
        vocab_size=256,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=8,
        embed_dim=512,
        max_seq_len=16,
        intermediate_dim=1536,
    )
    from torchtune.models.llama2 import llama2

    with torch.device("meta"):
        model = llama2(**build)
    utils.shard_model(model, torch.device("cpu"), layer_types=(TransformerDecoderLayer,))
    model.to_empty(device="cpu")
    full_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    full_sd = None
    if rank == 0:  # what the checkpointer would hand over
        full_sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    dist.barrier()
    _reset_peak_rss()
    base = _peak_rss_mib_since_reset()
    utils.load_from_full_state_dict(model, full_sd)
    del full_sd
    load_peak = _peak_rss_mib_since_reset() - base
    dist.barrier()
    _reset_peak_rss()
    base = _peak_rss_mib_since_reset()
    sd = utils.gather_full_state_dict(model)
    gather_peak = _peak_rss_mib_since_reset() - base
    del sd
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(f"{full_mib} {load_peak} {gather_peak}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_no_rank_holds_a_second_full_copy(tmp_path):
    """Peak growth of resident memory while loading and while gathering for a save, per
    rank, on a ~200 MiB model of 16 layers. Loading makes each rank's half shard resident
    (``to_empty`` only reserved it) plus a tensor in flight: a full copy on top would mean
    >= 1.5x the model. Gathering leaves rank 1 with nothing and rank 0 with one full copy."""
    mp.start_processes(
        _memory_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn"
    )
    full_mib, load1, gather1 = map(float, (tmp_path / "rank1.txt").read_text().split())
    _, load0, gather0 = map(float, (tmp_path / "rank0.txt").read_text().split())
    print(
        f"model {full_mib:.0f} MiB; peak growth MiB: load r0 {load0:.0f} r1 {load1:.0f}, "
        f"gather r0 {gather0:.0f} r1 {gather1:.0f}"
    )
    assert full_mib > 150
    for load in (load0, load1):  # rank 0's full state dict existed before
        assert 0.4 * full_mib < load < 0.75 * full_mib
    assert gather1 < 0.25 * full_mib
    assert gather0 < 1.25 * full_mib
