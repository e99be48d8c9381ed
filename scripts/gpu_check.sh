#!/usr/bin/env bash
# Copyright (c) torchtune contributors. BSD-3-Clause license.
#
# bash scripts/gpu_check.sh [OUT_DIR]
#
# A few-minute check of the distributed recipes on ONE CUDA GPU (torchrun, nproc 1, NCCL):
#   1. full_finetune_distributed and full_finetune_single_device in fp32 on the same data:
#      per-step losses must agree (NCCL with one rank, FSDP2 sharding over one device);
#   2. full_finetune_distributed and lora_finetune_distributed in bf16 (fp32 masters, bf16
#      compute, fp32 reduction) with activation checkpointing;
#   3. the tests marked `gpu` in tests/recipes/test_*_distributed.py;
#   4. (cuda only; SKIP_8B=1 skips it) the benchmark on Llama 3.1 8B shapes with random weights,
#      bf16, LoRA (rank 8, q/v), batch 2 x 2048: tokens/s and peak memory, ours and HF + PEFT.
# Prints per-step losses, tokens/s and peak memory from the recipes' logs. Run from the repo
# root in an environment with torchtune installed (pip install -e ".[dev]"); it builds a tiny
# model, tokenizer and dataset locally (no downloads). DEVICE=cpu runs steps 1-2 on CPU
# (gloo) to check the script itself.
set -euo pipefail
DEVICE=${DEVICE:-cuda}

OUT=${1:-/tmp/torchtune_gpu_check}
rm -rf "$OUT" && mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ $DEVICE == cuda ]]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.__version__, torch.cuda.get_device_name(0), 'nccl', torch.cuda.nccl.version())"
fi

# Tiny HF Llama (vocab 400, 3 layers), SentencePiece tokenizer, 40 Alpaca samples.
python - "$OUT" <<'EOF'
import sys
from pathlib import Path
from tests.recipes.single_device_utils import build_tiny_assets, tiny_overrides
root = Path(sys.argv[1])
assets = build_tiny_assets(root / "assets")
overrides = [o for o in tiny_overrides(assets, root) if not o.startswith(("output_dir=", "device="))]
(root / "overrides.txt").write_text("\n".join(overrides))
EOF
mapfile -t TINY < "$OUT/overrides.txt"
RUN=(device=$DEVICE shuffle=True seed=5 batch_size=4 gradient_accumulation_steps=2 epochs=1
     max_steps_per_epoch=5 clip_grad_norm=1.0)
TORCHRUN=(--nnodes 1 --nproc_per_node 1 --master_port 29533)

tune "${TORCHRUN[@]}" full_finetune_distributed --config tiny/full_distributed "${TINY[@]}" \
    "${RUN[@]}" dtype=fp32 output_dir="$OUT/full_dist_fp32"
tune full_finetune_single_device --config tiny/full "${TINY[@]}" \
    "${RUN[@]}" dtype=fp32 output_dir="$OUT/full_single_fp32"
tune "${TORCHRUN[@]}" full_finetune_distributed --config tiny/full_distributed "${TINY[@]}" \
    "${RUN[@]}" dtype=bf16 enable_activation_checkpointing=True output_dir="$OUT/full_dist_bf16"
tune "${TORCHRUN[@]}" lora_finetune_distributed --config tiny/lora_distributed "${TINY[@]}" \
    "${RUN[@]}" dtype=bf16 enable_activation_checkpointing=True output_dir="$OUT/lora_dist_bf16"

python - "$OUT" <<'EOF'
import sys
from pathlib import Path
from tests.recipes.single_device_utils import read_disk_log
root = Path(sys.argv[1])
runs = {}
for name in ["full_single_fp32", "full_dist_fp32", "full_dist_bf16", "lora_dist_bf16"]:
    rows = read_disk_log(root / name)
    runs[name] = rows
    print(f"\n{name}:")
    for r in rows:
        print(f"  step {r['step']:2d}  loss {r['loss']:.6f}  tok/s {r['tokens_per_second']:9.0f}"
              f"  peak {r['peak_memory_gib']:.3f} GiB")
diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["full_dist_fp32"], runs["full_single_fp32"]))
print(f"\nmax |loss(full_dist_fp32) - loss(full_single_fp32)| = {diff:.2e} (expect < 1e-4)")
assert diff < 1e-4, "distributed and single-device fp32 losses disagree"
EOF

[[ $DEVICE == cuda ]] && python -m pytest -q -m gpu tests/recipes/test_full_finetune_distributed.py \
    tests/recipes/test_lora_finetune_distributed.py -p no:cacheprovider
if [[ $DEVICE == cuda && -z ${SKIP_8B:-} ]]; then
    python -m benchmarks.finetune --shape llama3_8b --device cuda --dtype bf16 --methods lora \
        --max-seq-len 2048 --batch-size 2 --out "$OUT/cuda_llama3_8b"
fi
echo "gpu_check: OK"
