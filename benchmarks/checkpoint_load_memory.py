# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Peak resident memory while a checkpointer loads a ~1 GB fp32 Llama2-shaped checkpoint.

    python benchmarks/checkpoint_load_memory.py [--size-gb 1.0] [--workdir /tmp/ckpt_bench]

For each format (HF safetensors single file and sharded, HF .bin sharded, Meta .pth, torchtune
.pt) it writes the checkpoint, then loads it with ``load_checkpoint()`` in a fresh Python
process, touches every tensor (so memory-mapped pages count), and reads that process's peak
RSS (``VmHWM`` in ``/proc/self/status``; ``ru_maxrss`` is unusable here because Linux carries
the parent's peak into a child across fork+exec). It prints peak RSS / checkpoint size, both
raw and net of the RSS the process had before loading (interpreter + torch). The target is
< 1.5x. A measurement, not a test.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

CHILD = """
import sys, torch
from torchtune import utils

def hwm():
    # VmHWM belongs to this process image; ru_maxrss would carry over the parent's peak
    # across fork+exec on Linux.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

kind, ckpt_dir, files = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
cls = {"hf": utils.FullModelHFCheckpointer, "meta": utils.FullModelMetaCheckpointer,
       "tune": utils.FullModelTorchTuneCheckpointer}[kind]
before = hwm()
sd = cls(ckpt_dir, files, "LLAMA2", ckpt_dir + "/out").load_checkpoint()["model"]
total = 0.0
for v in sd.values():  # touch every byte
    total += float(v.float().sum()) if v.numel() < 1_000_000 else float(v.sum())
print(before, hwm())
"""


def _shapes(size_gb: float):
    """Llama2-like native shapes (dim 2048, vocab 32000) with as many layers as fit size_gb."""
    dim, hidden, vocab, n_heads = 2048, 5632, 32000, 16
    shapes = {
        "tok_embeddings.weight": (vocab, dim),
        "norm.scale": (dim,),
        "output.weight": (vocab, dim),
    }
    per_layer = 4 * dim * dim + 3 * dim * hidden + 2 * dim
    fixed = 2 * vocab * dim + dim
    n_layers = max(1, round((size_gb * 2**30 / 4 - fixed) / per_layer))
    for i in range(n_layers):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            shapes[p + f"attn.{name}.weight"] = (dim, dim)
        shapes[p + "mlp.w1.weight"] = (hidden, dim)
        shapes[p + "mlp.w2.weight"] = (dim, hidden)
        shapes[p + "mlp.w3.weight"] = (hidden, dim)
        shapes[p + "sa_norm.scale"] = (dim,)
        shapes[p + "mlp_norm.scale"] = (dim,)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_heads,
        "num_hidden_layers": n_layers,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
    }
    params = {
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "vocab_size": vocab,
        "multiple_of": 256,
        "norm_eps": 1e-5,
    }
    return shapes, config, params


def _write(workdir: Path, size_gb: float):
    from safetensors.torch import save_file

    from torchtune.models.llama2 import tune_to_hf, tune_to_meta

    shapes, config, params = _shapes(size_gb)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    cases = {}

    d = workdir / "hf_single"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    hf = tune_to_hf(sd)
    hf = {k: v.contiguous() for k, v in hf.items()}
    save_file(hf, str(d / "model.safetensors"), metadata={"format": "pt"})
    cases["HF safetensors, 1 file"] = ("hf", d, ["model.safetensors"])

    for fmt in ("safetensors", "bin"):
        d = workdir / f"hf_sharded_{fmt}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config))
        keys, n = list(hf), 4
        names = [f"model-{i + 1:05d}-of-{n:05d}.{fmt}" for i in range(n)]
        per = -(-len(keys) // n)
        for i, name in enumerate(names):
            shard = {k: hf[k] for k in keys[i * per : (i + 1) * per]}
            save_file(shard, str(d / name)) if fmt == "safetensors" else torch.save(shard, d / name)
        cases[f"HF {fmt}, {n} shards"] = ("hf", d, names)
    del hf

    d = workdir / "meta"
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.json").write_text(json.dumps(params))
    heads = (config["num_attention_heads"], config["num_key_value_heads"])
    torch.save(tune_to_meta(sd, *heads), d / "consolidated.00.pth")
    cases["Meta .pth"] = ("meta", d, ["consolidated.00.pth"])

    d = workdir / "tune"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(sd, d / "model.pt")
    cases["torchtune .pt"] = ("tune", d, ["model.pt"])
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ckpt_load_memory_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args()
    try:
        cases = _write(args.workdir, args.size_gb)
        print(f"{'format':<26} {'size GB':>8} {'peak RSS GB':>12} {'ratio':>6} {'net ratio':>10}")
        for label, (kind, d, files) in cases.items():
            size = sum((d / f).stat().st_size for f in files)
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, kind, str(d), ",".join(files)],
                capture_output=True,
                text=True,
                check=True,
            )
            before, peak = map(int, proc.stdout.split()[-2:])
            print(
                f"{label:<26} {size / 2**30:8.3f} {peak / 2**30:12.3f} "
                f"{peak / size:6.2f} {(peak - before) / size:10.2f}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
