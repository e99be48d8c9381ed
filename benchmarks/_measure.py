# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Timing, memory and FLOP arithmetic for ``benchmarks/finetune.py``."""

import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

_GIB = 1024**3


def machine_info(device: torch.device) -> Dict[str, str]:
    """What the numbers were measured on."""
    info = {
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "device": str(device),
        "cpu_count": str(os.cpu_count()),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or "unknown"
    try:
        info["loadavg_1min"] = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak_flops(device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """Best FLOP/s of square matmuls (CPU fp32: 1024 and 2048) in this process's thread count.

    On a shared machine, other load lowers this peak as much as it lowers training speed; the
    benchmark measures it just before and after each method's timed rounds and keeps the
    higher value.
    """
    if device.type != "cpu":
        sizes = (4096, 8192)
    elif dtype == torch.float32:
        sizes = (1024, 2048)
    else:  # CPUs without bf16 matmul units run it near 1 GFLOP/s: a 2048 cube takes 20 s
        sizes = (512,)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up (thread pool, cuBLAS handles)
        sync(device)
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def model_flops_per_token(n_params: int, method: str) -> int:
    """Training FLOPs per token from the weights alone (attention scores not counted).

    Forward is 2N; backward is 2N for activation gradients plus 2N for weight gradients.
    LoRA's frozen weights need no weight gradients, so LoRA costs 4N (its adapters are
    negligible), QLoRA too (dequantizing is not counted); full fine-tuning 6N.
    """
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be full, lora or qlora; got {method!r}")
    return (6 if method == "full" else 4) * n_params


def mfu(tokens_per_s: float, n_params: int, method: str, peak_flops: float) -> float:
    """Model FLOP utilisation: ``model_flops_per_token * tokens/s / peak``."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return model_flops_per_token(n_params, method) * tokens_per_s / peak_flops


def packed_windows(lengths: Sequence[int], max_seq_len: int, rows: int) -> List[Tuple[int, int]]:
    """Split a sample stream into windows that pack into exactly ``rows`` rows each.

    A window grows sample by sample while ``PackedDataset``'s plan (``pack_plan``, best fit
    within the window; longer samples truncated to ``max_seq_len``) still needs at most
    ``rows`` rows, so our side runs full batches while the reference sees exactly the same
    samples. Packing only within a window fills rows less well than packing a whole dataset
    does. A trailing incomplete window is dropped.

    Returns:
        ``[(start, end), ...]`` sample index ranges.
    """
    from torchtune.datasets._packed import pack_plan

    windows, start = [], 0
    for i in range(len(lengths)):
        if len(pack_plan(lengths[start : i + 1], max_seq_len)) > rows:
            windows.append((start, i))
            start = i
    return windows


def alternate(
    runners: Dict[str, Tuple[Callable, List[List[Dict]]]], warmup: int, device: torch.device
) -> Dict[str, Dict]:
    """Run each runner's batches window by window, alternating which side goes first.

    Args:
        runners: ``name -> (step, windows)`` where ``windows[r]`` is that runner's list of
            batches for round ``r`` (every runner sees the same samples in a round).
        warmup: rounds run but not timed (allocator warm-up, optimizer state, compiles).
        device: for synchronisation.

    Returns:
        ``name -> {"seconds", "steps", "real_tokens", "all_tokens", "round_tok_s", "losses"}``
        over the timed rounds.
    """
    from benchmarks._sides import count_tokens

    names = list(runners)
    n_rounds = len(next(iter(runners.values()))[1])
    stats = {
        n: {
            "seconds": 0.0,
            "steps": 0,
            "real_tokens": 0,
            "all_tokens": 0,
            "round_tok_s": [],
            "losses": [],
        }
        for n in names
    }
    for r in range(n_rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            step, windows = runners[name]
            seconds, real, total = 0.0, 0, 0
            for batch in windows[r]:
                sync(device)
                t0 = time.perf_counter()
                loss = step(batch)  # returns a float: a device sync point
                seconds += time.perf_counter() - t0
                counts = count_tokens(batch)
                real, total = real + counts["real"], total + counts["all"]
                stats[name]["losses"].append(loss)
            if r >= warmup:
                s = stats[name]
                s["seconds"] += seconds
                s["steps"] += len(windows[r])
                s["real_tokens"] += real
                s["all_tokens"] += total
                s["round_tok_s"].append(round(real / seconds, 1))
    return stats


def summarize(s: Dict) -> Dict:
    return {
        "tok_s_real": s["real_tokens"] / s["seconds"],
        "tok_s_all": s["all_tokens"] / s["seconds"],
        "s_per_step": s["seconds"] / max(s["steps"], 1),
        "padding_fraction": 1 - s["real_tokens"] / max(s["all_tokens"], 1),
        "steps": s["steps"],
        "round_tok_s_real": s["round_tok_s"],
    }


# ---------------------------------------------------------------- memory


def vm_hwm_bytes() -> int:
    """This process's peak RSS (``VmHWM``). ``ru_maxrss`` is unusable for fresh subprocesses:
    Linux carries the parent's peak into a child across fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def vm_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak(device: torch.device) -> bool:
    """Restart peak tracking: CUDA's allocator stats, or VmHWM via ``/proc/self/clear_refs``
    (Linux >= 4.0). Returns False where the peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / _GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / _GIB,
        }
    return {"peak_rss_gib": vm_hwm_bytes() / _GIB}
