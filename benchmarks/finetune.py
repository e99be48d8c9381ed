# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Our fine-tuning step against a plain Hugging Face loop: tokens/s, peak memory, MFU, levers.

    python -m benchmarks.finetune --shape small --methods lora full --levers all \
        --out benchmarks/results/cpu_small
    python -m benchmarks.finetune --shape 7b --device cuda --dtype bf16 --methods lora \
        --max-seq-len 2048 --batch-size 2 --out benchmarks/results/cuda_7b
    python -m benchmarks.finetune --shape llama3_2_1b --methods lora qlora --batch-size 1 \
        --out benchmarks/results/cpu_1b_qlora     # + "qlora / our lora" memory and speed

For each method (``full``; ``lora`` = rank 8 on q/v; ``qlora`` = that over a base whose
decoder-layer linears are NF4, ours ``quantize_base=True``, the reference bitsandbytes'
``Linear4bit`` under PEFT) both sides start from the same random
weights (and adapter) and the same AdamW settings, and train on the same Alpaca-like samples
(``benchmarks/alpaca_like_data.py``): ours through the recipes' step (``training.optimizer_step``)
with its levers (packing, chunked CE, ...), the reference as ``LlamaForCausalLM`` (+ PEFT) with
batches padded to their longest sample. The sample stream is cut into windows that pack into
exactly ``rows_per_window`` rows; in every round both sides train on the same window, the
side going first alternating, after ``warmup`` untimed rounds.

Speed is measured with both sides in this process (on CUDA with ``--isolate``, each in its own
subprocess, since two 7B models do not fit together). Peak memory always comes from a fresh
subprocess per measurement (CPU: ``VmHWM`` after setup and one warm-up step reset the peak,
so it is the training peak; CUDA: ``max_memory_allocated``/``reserved``).

MFU counts ``6N`` (full) or ``4N`` (LoRA) FLOPs per token, N = parameters other than the
embedding table, over the fp32 (or bf16) square-matmul peak this script measures with the
same thread count just before and after each method's timed rounds. Lever rows compare one
change against our default in the same way.
"""

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks import _measure as M
from benchmarks._sides import (
    LORA_METHODS,
    SHAPES,
    Levers,
    apply_cpu_heap,
    build_hf,
    build_ours,
    make_batches,
    make_weights,
    non_embedding_params,
)
from benchmarks.alpaca_like_data import AlpacaLikeDataset

# Each lever: the variants of our default that it is measured against.
LEVERS = {
    "packing": [{"data": "padded"}, {"data": "grouped"}],
    "drop_unscored": [{"drop_unscored": False}, {"drop_unscored": False, "data": "padded"}],
    "fused_ce": [{"loss": "chunked"}, {"loss": "plain"}],
    "lora_frozen": [{"frozen": False}],
    "adamw": [{"optim": "loop"}, {"optim": "foreach"}, {"optim": "fused"}],
    "document_attention": [{"attn": "dense"}],
    "sdpa": [{"attn": "eager"}],
    "ce_chunks": [{"ce_chunks": 2}, {"ce_chunks": 8}],
    "activation_checkpointing": [{"ac": True}, {"ac": "selective"}, {"ac": False}],
    "compile": [{"compile": True}],
    "cpu_heap": [{"cpu_heap": "default"}],
}
# Levers that change the whole process: both settings are measured in fresh processes.
PROCESS_LEVERS = ("cpu_heap",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Our side's settings per method unless --ac/--optim say otherwise. Full fine-tuning of
# `small` fits the memory target without activation checkpointing (0.71x the reference's
# peak RSS), which is 1.15x faster than selective checkpointing now that steps no longer
# page-fault; it steps AdamW with the fused kernel (no parameter-sized temporaries). LoRA's
# frozen weights keep little besides matmul outputs anyway and its optimizer is tiny.
DEFAULT_LEVERS = {"lora": Levers(), "qlora": Levers(), "full": Levers(ac=False, optim="fused")}


def _ac(name: str):
    return {"none": False, "full": True, "selective": "selective"}[name]


def _windows(args, n_rounds: int):
    """Sample windows (lists of samples) for ``n_rounds`` rounds."""
    vocab = SHAPES[args.shape]["vocab_size"]
    rows = args.batch_size * args.batches_per_window
    # Roughly 2.9 samples per 512-token row; draw plenty and cut.
    per_row = max(1, 2 * args.max_seq_len // 180)
    ds = AlpacaLikeDataset(per_row * rows * (n_rounds + 1), vocab, args.max_seq_len, args.seed)
    windows = M.packed_windows(ds.lengths, args.max_seq_len, rows)[:n_rounds]
    if len(windows) < n_rounds:
        raise RuntimeError(f"only {len(windows)} windows for {n_rounds} rounds")
    return [[ds[i] for i in range(a, b)] for a, b in windows]


def _build(side: str, args, method: str, levers: Levers, weights, adapter, device):
    dtype = DTYPES[args.dtype]
    if side == "hf":
        gc = getattr(args, "ref_ac", False)
        return build_hf(args.shape, method, weights, adapter, device, dtype, gc)
    return build_ours(args.shape, method, levers, weights, adapter, device, dtype)


def _runner(step, data: str, windows, args):
    return step, [make_batches(w, data, args.batch_size, args.max_seq_len) for w in windows]


# ---------------------------------------------------------------- fresh-process measurement


def worker(spec: Dict) -> Dict:
    """One side in a fresh process: setup, warm-up rounds, reset the peak, timed rounds."""
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    levers = Levers(**spec["levers"])
    dtype = DTYPES[args.dtype]
    # The weights stand in for a checkpoint that is freed once loaded: drawn before the heap
    # setting, their memory goes back to the system when they are dropped (under `retain` the
    # heap would keep those pages resident for the whole run, a setup artefact that would hide
    # what QLoRA's 4-bit base saves).
    weights, adapter = make_weights(args.shape, spec["method"], args.seed, args.device, dtype)
    apply_cpu_heap(levers.cpu_heap, device)
    step = _build(spec["side"], args, spec["method"], levers, weights, adapter, device)
    del weights, adapter
    setup = M.peak_memory(device)  # includes the weights being built twice
    windows = _windows(args, args.warmup + spec.get("rounds", args.mem_rounds))
    data = "hf" if spec["side"] == "hf" else levers.data
    _, batches = _runner(step, data, windows, args)
    M.alternate({"x": (step, batches[: args.warmup])}, warmup=args.warmup, device=device)
    # From here on the peak is the training peak: optimizer state exists, setup is done.
    reset_ok = M.reset_peak(device)
    stats = M.alternate({"x": (step, batches[args.warmup :])}, warmup=0, device=device)
    return {
        "setup": setup,
        "peak": M.peak_memory(device),
        "peak_reset_ok": reset_ok,
        **M.summarize(stats["x"]),
    }


def fresh_process(
    side: str, method: str, levers: Levers, args, rounds: Optional[int] = None
) -> Dict:
    spec = {"side": side, "method": method, "levers": levers.to_dict(), "args": vars(args)}
    if rounds is not None:
        spec["rounds"] = rounds
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {side}/{method} failed:\n{proc.stderr[-3000:]}")


def _peak_of(peak: Dict) -> float:
    return peak.get("peak_rss_gib", peak.get("peak_allocated_gib"))


def _peak_gib(result: Dict) -> float:
    return _peak_of(result["peak"])


def _combine(results: List[Dict]) -> Dict:
    """One side's speed over several worker processes: their timed tokens over their time."""
    seconds = sum(r["s_per_step"] * r["steps"] for r in results)
    steps = sum(r["steps"] for r in results)
    real = sum(r["tok_s_real"] * r["s_per_step"] * r["steps"] for r in results)
    total = sum(r["tok_s_all"] * r["s_per_step"] * r["steps"] for r in results)
    return {
        "tok_s_real": real / seconds,
        "tok_s_all": total / seconds,
        "s_per_step": seconds / steps,
        "padding_fraction": 1 - real / total,
        "steps": steps,
        "round_tok_s_real": [x for r in results for x in r["round_tok_s_real"]],
        "process_tok_s_real": [round(r["tok_s_real"], 2) for r in results],
    }


# ---------------------------------------------------------------- the comparison


def compare(method: str, args, device) -> Dict:
    """Ours (default levers) vs the reference, then each lever variant vs ours.

    MFU is over the matmul peak measured just before and just after this method's timed
    rounds (the higher of the two): this host's speed drifts by 20% within a run, so one
    peak for the whole run mis-states the MFU of whichever method ran in a slower stretch.
    """
    dtype = DTYPES[args.dtype]
    n_rounds = args.warmup + args.rounds
    windows = _windows(args, n_rounds)
    base = replace(
        DEFAULT_LEVERS[method],
        data=args.data,
        compile=args.compile,
        cpu_heap=args.cpu_heap,
        **({} if args.ac is None else {"ac": _ac(args.ac)}),
        **({} if args.optim is None else {"optim": args.optim}),
    )
    n_params = non_embedding_params(args.shape)
    result = {
        "method": method,
        "n_params_non_embedding": n_params,
        "levers_default": base.to_dict(),
    }

    peak_flops = M.gemm_peak_flops(device, dtype)
    if args.isolate:
        # Each side in its own processes, in ABBA order when repeated (the host's speed
        # drifts); each process's peak is a fresh-process measurement, so the memory
        # reported is the highest of a side's processes and none are run just for memory.
        order = ["ours", "hf", "hf", "ours"] * args.isolate_repeats
        runs = {"ours": [], "hf": []}
        for side in order[: 2 * args.isolate_repeats]:
            runs[side].append(fresh_process(side, method, base, args))
        speed, mem = {}, {}
        for side, results in runs.items():
            speed[side] = _combine(results)
            mem[side] = {"peak": max((r["peak"] for r in results), key=lambda p: _peak_of(p))}
            mem[side]["setup"] = max((r["setup"] for r in results), key=lambda p: _peak_of(p))
    else:
        weights, adapter = make_weights(args.shape, method, args.seed, args.device, dtype)
        ours = _build("ours", args, method, base, weights, adapter, device)
        hf = _build("hf", args, method, None, weights, adapter, device)
        stats = M.alternate(
            {
                "ours": _runner(ours, base.data, windows, args),
                "hf": _runner(hf, "hf", windows, args),
            },
            warmup=args.warmup,
            device=device,
        )
        speed = {k: M.summarize(v) for k, v in stats.items()}
        del hf
        mem = None
    peak_flops = max(peak_flops, M.gemm_peak_flops(device, dtype))
    result["peak_flops"] = peak_flops
    for side in ("ours", "hf"):
        s = speed[side]
        s["mfu_real"] = M.mfu(s["tok_s_real"], n_params, method, peak_flops)
        s["mfu_all"] = M.mfu(s["tok_s_all"], n_params, method, peak_flops)
    if not args.skip_memory and not args.isolate:
        mem = {side: fresh_process(side, method, base, args) for side in ("ours", "hf")}
    if mem is not None:
        for side in ("ours", "hf"):
            speed[side]["peak"] = mem[side]["peak"]
            speed[side]["setup_memory"] = mem[side]["setup"]
    result["ours"], result["hf"] = speed["ours"], speed["hf"]
    result["ratios"] = {
        "tok_s_real": speed["ours"]["tok_s_real"] / speed["hf"]["tok_s_real"],
        "tok_s_all": speed["ours"]["tok_s_all"] / speed["hf"]["tok_s_all"],
    }
    if mem is not None:
        result["ratios"]["peak_memory"] = _peak_gib(mem["ours"]) / _peak_gib(mem["hf"])

    result["levers"] = []
    for lever in args.levers:
        if lever == "lora_frozen" and method not in LORA_METHODS:
            continue
        for change in LEVERS[lever]:
            variant = replace(base, **change)
            if variant == base:
                continue
            per_process = any(k in PROCESS_LEVERS for k in change)
            if per_process:  # speed and memory of both settings, each in a fresh process
                o_res = fresh_process("ours", method, base, args, rounds=args.rounds)
                v_res = fresh_process("ours", method, variant, args, rounds=args.rounds)
            elif args.isolate:
                v_res = fresh_process("ours", method, variant, args)
                o_res = {"tok_s_real": speed["ours"]["tok_s_real"]}
            else:
                var_step = _build("ours", args, method, variant, weights, adapter, device)
                v_stats = M.alternate(
                    {
                        "ours": _runner(ours, base.data, windows, args),
                        "variant": _runner(var_step, variant.data, windows, args),
                    },
                    warmup=args.warmup,
                    device=device,
                )
                del var_step
                o_res, v_res = M.summarize(v_stats["ours"]), M.summarize(v_stats["variant"])
            row = {
                "lever": lever,
                "variant": change,
                "speed_ratio_variant_over_default": v_res["tok_s_real"] / o_res["tok_s_real"],
            }
            if per_process:
                row["memory_ratio_variant_over_default"] = _peak_gib(v_res) / _peak_gib(o_res)
            elif not args.skip_memory and not args.skip_lever_memory:
                v_mem = fresh_process("ours", method, variant, args)
                row["memory_ratio_variant_over_default"] = _peak_gib(v_mem) / _peak_gib(mem["ours"])
            print(f"[{method}] lever {lever} {change}: {json.dumps(row)}", flush=True)
            result["levers"].append(row)
    return result


# ---------------------------------------------------------------- report


_REFERENCE = {"full": "HF", "lora": "HF + PEFT", "qlora": "HF + PEFT + bitsandbytes"}


def qlora_vs_lora(results: List[Dict]) -> Optional[Dict]:
    """Our QLoRA over our LoRA (same shape, data and adapter): peak memory and speed, or None
    unless both methods ran."""
    by_method = {r["method"]: r for r in results}
    if not {"lora", "qlora"} <= set(by_method):
        return None
    q, lora = by_method["qlora"]["ours"], by_method["lora"]["ours"]
    out = {"tok_s_real": q["tok_s_real"] / lora["tok_s_real"]}
    if "peak" in q and "peak" in lora:
        out["peak_memory"] = _peak_gib(q) / _peak_gib(lora)
    return out


def markdown(report: Dict) -> str:
    m, a = report["machine"], report["args"]

    def ref_name(method: str) -> str:
        return _REFERENCE[method] + (" (grad. ckpt.)" if a.get("ref_ac") else "")

    lines = [
        f"# Fine-tuning benchmark: shape `{a['shape']}`, {a['dtype']}, batch {a['batch_size']} x "
        f"max_seq_len {a['max_seq_len']}, Alpaca-like data",
        "",
        f"Machine: {m.get('cpu', '?')}"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, {m['threads']} threads; load average at start "
        f"{m.get('loadavg_1min', '?')}. Matmul peak measured around each method's timed rounds: "
        + ", ".join(f"{r['method']} {r['peak_flops'] / 1e9:.1f}" for r in report["results"])
        + " GFLOP/s.",
        "",
        f"Process-wide malloc setting (both sides): `cpu_heap={a.get('cpu_heap', 'default')}`"
        + (
            " (freed memory stays mapped, as in the recipes on CPU)."
            if a.get("cpu_heap") == "retain"
            else " (glibc's defaults)."
        ),
        "",
        f"Command: `{report['command']}`",
        "",
        "Activation checkpointing: ours "
        + ", ".join(f"{r['method']} `{r['levers_default']['ac']}`" for r in report["results"])
        + "; the reference "
        + ("recomputes each layer (`--ref-ac`)." if a.get("ref_ac") else "keeps everything."),
        "",
        "| method | side | non-pad tok/s | all tok/s | s/step | padding | MFU (non-pad) | MFU (all) | peak memory GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in report["results"]:
        for side in ("ours", "hf"):
            s = res[side]
            peak = s.get("peak", {})
            mem = peak.get("peak_rss_gib", peak.get("peak_allocated_gib"))
            mem_s = f"{mem:.2f}" if mem is not None else "-"
            if "peak_reserved_gib" in peak:
                mem_s += f" (reserved {peak['peak_reserved_gib']:.2f})"
            lines.append(
                f"| {res['method']} | {'ours' if side == 'ours' else ref_name(res['method'])} "
                f"| {s['tok_s_real']:.0f} | {s['tok_s_all']:.0f} | {s['s_per_step']:.3f} "
                f"| {s['padding_fraction']:.0%} | {s['mfu_real']:.0%} | {s['mfu_all']:.0%} | {mem_s} |"
            )
    lines += [
        "",
        "| method | ours/ref non-pad tok/s | ours/ref all tok/s | ours/ref peak memory |",
        "|---|---|---|---|",
    ]
    for res in report["results"]:
        r = res["ratios"]
        mem = f"{r['peak_memory']:.2f}x" if "peak_memory" in r else "-"
        lines.append(
            f"| {res['method']} | {r['tok_s_real']:.2f}x | {r['tok_s_all']:.2f}x | {mem} |"
        )
    q = report.get("qlora_vs_lora")
    if q:
        mem = f"{q['peak_memory']:.2f}x" if "peak_memory" in q else "-"
        lines += [
            "",
            "| our QLoRA / our LoRA | non-pad tok/s | peak memory |",
            "|---|---|---|",
            f"| ratio | {q['tok_s_real']:.2f}x | {mem} |",
        ]
    if any(res["levers"] for res in report["results"]):
        lines += [
            "",
            "Levers: one change to our default, speed (non-pad tok/s) and peak memory "
            "relative to the default (> 1 speed / < 1 memory = the change wins).",
            "",
            "| method | lever | change | speed | memory |",
            "|---|---|---|---|---|",
        ]
        for res in report["results"]:
            for row in res["levers"]:
                mem = row.get("memory_ratio_variant_over_default")
                lines.append(
                    f"| {res['method']} | {row['lever']} | {row['variant']} "
                    f"| {row['speed_ratio_variant_over_default']:.2f}x | "
                    f"{'-' if mem is None else f'{mem:.2f}x'} |"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument(
        "--methods", nargs="+", choices=["full", "lora", "qlora"], default=["lora", "full"]
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument(
        "--batches-per-window",
        type=int,
        default=2,
        help="our batches per round; the reference trains on the same samples",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds")
    p.add_argument("--mem-rounds", type=int, default=1, help="timed rounds in memory workers")
    p.add_argument("--data", choices=["packed", "grouped", "padded"], default="packed")
    p.add_argument(
        "--compile",
        action="store_true",
        help="our side runs with the recipes' compile: true (each decoder layer compiled)",
    )
    p.add_argument(
        "--ac",
        choices=["none", "full", "selective"],
        default=None,
        help="our side's enable_activation_checkpointing (False / True / selective); default: none",
    )
    p.add_argument(
        "--ref-ac",
        action="store_true",
        help="the reference recomputes each layer in backward (transformers' gradient "
        "checkpointing, on by default in PEFT's QLoRA preparation); compare with --ac full",
    )
    p.add_argument(
        "--optim",
        choices=["loop", "foreach", "fused"],
        default=None,
        help="our side's AdamW implementation; default: fused for full, foreach for LoRA",
    )
    p.add_argument("--levers", nargs="*", default=[], help=f"'all' or some of {list(LEVERS)}")
    p.add_argument(
        "--cpu-heap",
        choices=["retain", "default"],
        default="retain",
        help="this process's malloc: retain freed memory as the recipes do on CPU "
        "(both sides run under it), or glibc's defaults",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--isolate",
        action="store_true",
        help="time each side in its own process (for models too big to hold twice)",
    )
    p.add_argument(
        "--isolate-repeats",
        type=int,
        default=1,
        help="with --isolate: processes per side (2 = ours, hf, hf, ours)",
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-lever-memory", action="store_true")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.levers == ["all"]:
        args.levers = [k for k in LEVERS if k != "compile"]  # compile stays opt-in: slow to build
    unknown = set(args.levers) - set(LEVERS)
    if unknown:
        p.error(f"unknown levers {sorted(unknown)}; choose from {list(LEVERS)}")
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return {}
    args_dict = {k: v for k, v in vars(args).items() if k != "worker"}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    apply_cpu_heap(args.cpu_heap, device)
    machine = M.machine_info(device)
    print(f"machine: {machine}", flush=True)
    worker_args = argparse.Namespace(**args_dict)
    results = []
    for method in args.methods:
        res = compare(method, worker_args, device)
        print(json.dumps({k: res[k] for k in ("method", "peak_flops", "ratios")}), flush=True)
        results.append(res)
    report = {
        "machine": machine,
        "args": args_dict,
        "results": results,
        "qlora_vs_lora": qlora_vs_lora(results),
        "command": "python -m benchmarks.finetune "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    md = markdown(report)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(md)
    return report


if __name__ == "__main__":
    main()
