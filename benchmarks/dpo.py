# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Our LoRA DPO step against a plain transformers + PEFT DPO loop: pair throughput, peak memory.

    python -m benchmarks.dpo --shape small --pairs-per-step 4 --steps 6 --warmup 2

Both sides start from the same random weights and adapter (``_sides.make_weights``: LoRA rank
8 on q/v with a random ``lora_b``), the same AdamW settings, and train on the same pairs, cut
from Alpaca-like samples (``alpaca_like_data``): the first half of a sample is the prompt
(masked), the chosen answer is its second half and the rejected answer another sample's. The
reference is the base model (adapters switched off) on both sides, as for a fresh adapter:
ours through the DPO recipes' step (``rlhf.preference_step`` with
``rlhf.lora_reference_logps``: one padding-free forward of chosen + rejected, logits only at
the scored positions), theirs as ``LlamaForCausalLM`` + PEFT over the padded pair batch (its
reference under ``disable_adapter()``), the DPO loss written out. Steps alternate which side
goes first after ``warmup`` untimed steps.

Peak memory comes from a fresh subprocess per side (CPU: ``VmHWM`` after setup and the warm-up
steps reset the peak, so it is the training peak; CUDA: ``max_memory_allocated``).
"""

import argparse
import json
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from benchmarks import _measure as M
from benchmarks._sides import (
    ADAMW,
    LORA,
    PAD_ID,
    ROPE,
    SHAPES,
    apply_cpu_heap,
    build_hf,
    make_weights,
)
from benchmarks.alpaca_like_data import AlpacaLikeDataset
from torchtune import config, rlhf, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_pairs
from torchtune.modules.peft import get_adapter_params, set_trainable_params

BETA = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_pair_batches(args) -> List[Dict[str, torch.Tensor]]:
    """``steps + warmup`` batches of ``pairs_per_step`` pairs (``padded_collate_pairs``)."""
    n = args.pairs_per_step * (args.steps + args.warmup)
    ds = AlpacaLikeDataset(n + 1, SHAPES[args.shape]["vocab_size"], args.max_seq_len, args.seed)
    pairs = []
    for i in range(n):
        a, b = ds[i]["tokens"], ds[i + 1]["tokens"]
        cut = len(a) // 2
        prompt, chosen, rejected = a[:cut], a[cut:], b[len(b) // 2 :]
        sample = {}
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            tokens = (prompt + answer)[: args.max_seq_len]
            labels = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + answer
            sample[f"{side}_tokens"], sample[f"{side}_labels"] = tokens, labels[: len(tokens)]
        pairs.append(sample)
    k = args.pairs_per_step
    return [padded_collate_pairs(pairs[i : i + k], padding_idx=PAD_ID) for i in range(0, n, k)]


def build_ours(args, weights, adapter, device, dtype):
    cfg_model = {
        "_component_": "torchtune.models.llama2.lora_llama2",
        **SHAPES[args.shape],
        **ROPE.get(args.shape, {}),
        **LORA,
        "lora_dropout": 0.0,
        "max_seq_len": 4096,
    }
    with utils.set_default_dtype(dtype), device:
        model = config.instantiate(OmegaConf.create(cfg_model))
    model.load_state_dict({**weights, **adapter}, strict=True)
    params = get_adapter_params(model)
    set_trainable_params(model, params)
    model.train()
    optimizer = torch.optim.AdamW(list(params.values()), **ADAMW)
    loss_fn = rlhf.DPOLoss(BETA)
    reference = partial(rlhf.lora_reference_logps, model, device=device, adapter_params=params)

    def step(batch):
        metrics = rlhf.preference_step(
            model,
            loss_fn,
            optimizer,
            [batch],
            params=params.values(),
            device=device,
            reference=reference,
        )
        return metrics["loss"]

    return step


def _hf_logps(model, batch):
    logits = model(input_ids=batch["tokens"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    scored = labels != CROSS_ENTROPY_IGNORE_IDX
    logps = torch.gather(
        F.log_softmax(logits[:, :-1].float(), -1), 2, labels.clamp(min=0).unsqueeze(-1)
    ).squeeze(-1)
    return (logps * scored).sum(1)


def build_theirs(args, weights, adapter, device, dtype):
    sft_step = build_hf(args.shape, "lora", weights, adapter, device, dtype)
    # The PEFT model; its SFT optimizer never steps, so it holds no state.
    model = sft_step.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)

    def step(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["attention_mask"] = (batch["tokens"] != PAD_ID).long()
        with torch.no_grad(), model.disable_adapter():
            ref_c, ref_r = _hf_logps(model, batch).chunk(2)
        pol_c, pol_r = _hf_logps(model, batch).chunk(2)
        h = BETA * ((pol_c - ref_c) - (pol_r - ref_r))
        loss = -F.logsigmoid(h).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _build(side, args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    weights, adapter = make_weights(args.shape, "lora", args.seed, args.device, dtype)
    build = build_ours if side == "ours" else build_theirs
    return build(args, weights, adapter, device, dtype), device


def _pairs_per_s(stats, args) -> float:
    return stats["steps"] * args.pairs_per_step / stats["seconds"]


def worker(side: str, args) -> Dict:
    """One side in a fresh process: setup, warm-up steps, reset the peak, timed steps."""
    torch.set_num_threads(args.threads)
    apply_cpu_heap(args.cpu_heap, torch.device(args.device))
    step, device = _build(side, args)
    batches = make_pair_batches(args)
    M.alternate({"x": (step, [batches[: args.warmup]])}, warmup=1, device=device)
    reset_ok = M.reset_peak(device)
    stats = M.alternate({"x": (step, [batches[args.warmup :]])}, warmup=0, device=device)["x"]
    return {
        "peak": M.peak_memory(device),
        "peak_reset_ok": reset_ok,
        "pairs_per_s": _pairs_per_s(stats, args),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cpu-heap",
        choices=["retain", "default"],
        default="retain",
        help="this process's malloc: retain freed memory as the DPO recipes do on CPU (both "
        "sides run under it), or glibc's defaults",
    )
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    torch.set_num_threads(args.threads)
    apply_cpu_heap(args.cpu_heap, torch.device(args.device))
    machine = M.machine_info(torch.device(args.device))  # load average before the run
    ours, device = _build("ours", args)
    theirs, _ = _build("theirs", args)
    batches = make_pair_batches(args)
    rounds = [[b] for b in batches]
    stats = M.alternate({"ours": (ours, rounds), "theirs": (theirs, rounds)}, args.warmup, device)
    first = {n: s["losses"][0] for n, s in stats.items()}
    result = {
        "machine": machine,
        "args": vars(args),
        "command": "python -m benchmarks.dpo " + " ".join(sys.argv[1:] if argv is None else argv),
        "first_step_loss": first,
        "pairs_per_s": {n: _pairs_per_s(s, args) for n, s in stats.items()},
    }
    for side in ("ours", "theirs"):
        cmd = [sys.executable, "-m", "benchmarks.dpo", "--worker", side, *(argv or sys.argv[1:])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result[f"memory_{side}"] = json.loads(out.strip().splitlines()[-1])
    result["load_after"] = f"{M.machine_info(device).get('loadavg_1min', '?')}"
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(markdown(result))


def markdown(result: Dict) -> str:
    """The result as a short table: pairs/s and peak memory, ours / theirs."""
    m, a = result["machine"], result["args"]
    speed, first = result["pairs_per_s"], result["first_step_loss"]

    def peak(side):
        p = result[f"memory_{side}"]["peak"]
        return p.get("peak_rss_gib", p.get("peak_allocated_gib"))

    def fresh(side):
        return result[f"memory_{side}"]["pairs_per_s"]

    rows = [
        f"# DPO benchmark: shape `{a['shape']}`, {a['dtype']}, {a['pairs_per_step']} pairs a step",
        "",
        f"Machine: {m.get('cpu', '?')}; torch {m['torch']}, {a['threads']} threads; load "
        f"average {m.get('loadavg_1min', '?')} at the start, {result.get('load_after', '?')} "
        f"at the end. Malloc (both sides): `cpu_heap={a.get('cpu_heap', 'default')}`.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| side | pairs/s (alternating, one process) | pairs/s (fresh process) "
        "| peak memory GiB | first-step loss |",
        "|---|---|---|---|---|",
    ]
    for side, name in (("ours", "ours"), ("theirs", "transformers + PEFT")):
        rows.append(
            f"| {name} | {speed[side]:.3f} | {fresh(side):.3f} | {peak(side):.2f} "
            f"| {first[side]:.6f} |"
        )
    rows += [
        "",
        f"ours / theirs: **{speed['ours'] / speed['theirs']:.2f}x** pairs/s alternating "
        f"({fresh('ours') / fresh('theirs'):.2f}x in fresh processes), "
        f"**{peak('ours') / peak('theirs'):.2f}x** peak memory.",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
