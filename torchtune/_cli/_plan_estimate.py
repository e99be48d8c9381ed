# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune plan``'s prediction: a config in, the peak memory per phase and component out.

The model is built on the meta device exactly as the recipe builds it (same dtype, the same
trainable set: every parameter for full fine-tuning, the adapters for LoRA). The sequence
lengths come from the run's own micro-batches when the dataset is local: the same loader,
sampler seed and ``drop_unscored_tails`` cut the recipe uses, so the heaviest micro-batch
is known exactly; otherwise ``batch_size x max_seq_len``.

CPU peak RSS is modelled as the recipes run it. With ``retain_freed_cpu_memory`` (every
recipe except QLoRA's) freed memory stays in the heap and is reused, so a phase's peak is
the high-water mark of live tensors; a later phase's new allocations are assumed not to
fit the earlier phase's freed pieces (the save's merged weights after training's
activations). The runtime share (interpreter, libraries, tokenizer, dataset, kernels'
scratch) is measured in this process after the same imports and one warm-up step on a toy
model.
"""

import gc
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from omegaconf import DictConfig

from torchtune import config, training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.attention import DocumentMask
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params
from torchtune.training import _memory_plan as F
from torchtune.training._next_token_loss import drop_unscored_tails

_CUDA_CONTEXT = 600 * 2**20  # CUDA context + cuBLAS workspaces, typical for recent drivers
_CUDA_FRAGMENTATION = {True: 0.03, False: 0.12}  # expandable_segments on / off
_SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1,
                      "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


@dataclass
class MicroBatch:
    tokens: int  # tokens the model runs on
    scored: int  # positions the loss scores
    by_document: bool  # flattened documents (True) or padded rows


@dataclass
class Plan:
    """A prediction: ``phases`` (setup, train, save) in bytes, ``components`` of the peak
    phase, ``peak_phase`` and ``when`` (which moment of which step)."""

    phases: Dict[str, int]
    components: Dict[str, int]
    peak_phase: str
    when: str
    notes: List[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase]


def safetensors_header_bytes(path: Path) -> Dict[str, int]:
    """Bytes by dtype of the tensors in a ``.safetensors`` file, from its header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out: Dict[str, int] = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        out[spec["dtype"]] = out.get(spec["dtype"], 0) + end - begin
    return out


def checkpoint_bytes(checkpointer: Any) -> int:
    """Bytes the checkpointer's files hold (safetensors: header only; else file size)."""
    total = 0
    for path in getattr(checkpointer, "_checkpoint_paths", None) or _guess_paths(checkpointer):
        path = Path(path)
        if path.suffix == ".safetensors":
            total += sum(safetensors_header_bytes(path).values())
        else:
            total += path.stat().st_size
    return total


def _guess_paths(checkpointer: Any) -> List[Path]:
    folder = Path(getattr(checkpointer, "_checkpoint_dir", "."))
    files = getattr(checkpointer, "_checkpoint_files", None) or []
    return [folder / f for f in files]


def build_meta_model(cfg: DictConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The config's model on the meta device; a LoRA model with only its adapters trainable,
    as the LoRA recipes set it."""
    with utils.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(cfg.model)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        set_trainable_params(model, get_adapter_params(model))
    return model


def micro_batches(cfg: DictConfig, tokenizer: Any, dataset: Any) -> List[List[MicroBatch]]:
    """Every optimizer step's micro-batches as the run draws them (all epochs)."""
    from torchtune.data import padding_id

    loop = training.LoopSettings.from_config(cfg)
    loader = training.build_dataloader(
        dataset,
        batch_size=int(cfg.batch_size),
        pad_id=padding_id(tokenizer),
        shuffle=bool(cfg.shuffle),
        seed=int(cfg.seed) if cfg.get("seed") is not None else 0,
    )
    accum = loop.gradient_accumulation_steps
    steps = training.steps_per_epoch(len(loader), accum, cfg.get("max_steps_per_epoch"))
    out = []
    for epoch in range(int(cfg.epochs)):
        for step in training.epoch_micro_batches(loader, epoch, steps, accum):
            out.append([_describe(mb) for mb in step])
    return out


def _describe(batch: Dict[str, Any]) -> MicroBatch:
    """What ``next_token_loss_sum`` runs the model on for this batch."""
    labels = batch["labels"]
    no_label = torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)
    scored = torch.cat([labels[:, 1:], no_label], dim=1) != CROSS_ENTROPY_IGNORE_IDX
    cut = drop_unscored_tails(batch, scored)
    packed = isinstance(batch.get("mask"), DocumentMask)
    if cut is None:
        return MicroBatch(batch["tokens"].numel(), int(scored.sum()), packed)
    return MicroBatch(cut[0]["tokens"].numel(), int(scored.sum()), True)


def warm_runtime_bytes(retain: bool, quantized: bool = False) -> int:
    """RSS of this process once the libraries a training step touches have run once (a toy
    decoder's forward, backward and AdamW step: thread pools, kernel scratch; with
    ``quantized`` a QLoRA toy, which loads bitsandbytes), in bytes."""
    from torchtune._cli._plan_measure import rss_bytes
    from torchtune.models.llama2 import llama2, lora_llama2

    if retain:
        utils.retain_freed_cpu_memory()
    kw = dict(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=64,
              intermediate_dim=128, max_seq_len=64)  # fmt: skip
    if quantized:
        toy = lora_llama2(lora_attn_modules=["q_proj"], lora_rank=2, lora_alpha=4,
                          quantize_base=True, **kw)  # fmt: skip
        for w in [m for m in toy.modules() if hasattr(m, "quantize_")]:
            w.quantize_(torch.randn(w.out_dim, w.in_dim))
    else:
        toy = llama2(**kw)
    opt = torch.optim.AdamW([p for p in toy.parameters() if p.requires_grad])
    tokens = torch.randint(0, 64, (2, 48))
    batch = {"tokens": tokens, "labels": tokens}
    loss, _ = training.next_token_loss_sum(
        toy, training.LinearCrossEntropyLoss(), batch, torch.device("cpu")
    )
    loss.backward()
    opt.step()
    del toy, opt, loss
    gc.collect()
    return rss_bytes()


@dataclass
class Inputs:
    """What the estimate needs besides the config: the measured runtime share at setup
    (libraries, tokenizer, dataset) and in training (after a warm-up step), the checkpoint's
    bytes, the micro-batches, and the device."""

    runtime: Tuple[int, int]
    checkpoint: int
    steps: List[List[MicroBatch]]
    device: str = "cpu"
    nproc: int = 1


def estimate(cfg: DictConfig, inp: Inputs) -> Plan:
    """Predict the run's peak memory per phase (see the module docstring)."""
    dtype = utils.get_dtype(str(cfg.dtype), torch.device("cpu"))
    model = build_meta_model(cfg, dtype)
    quantized = bool(cfg.model.get("quantize_base", False))
    ac = {None: None, False: None, True: "full", "selective": "selective"}[
        cfg.get("enable_activation_checkpointing")
    ]
    by_dtype = F.tensor_bytes_by_dtype(model)
    params = sum(by_dtype.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = sum(p.numel() * p.element_size() for p in trainable.values())
    opt_cfg = cfg.optimizer
    adam = F.adamw_state_bytes(
        trainable, bool(opt_cfg.get("fused", False)), bool(opt_cfg.get("foreach", False))
    )
    world = max(inp.nproc, 1)
    # FSDP: each rank holds 1/N of the parameters, gradients and optimizer state, plus the
    # all-gathered layer it runs and the next one, prefetched.
    layer_bytes = max(
        sum(t.numel() * t.element_size() for t in layer.parameters()) for layer in model.layers
    )
    gathered = 2 * layer_bytes if world > 1 else 0
    params, grads = params // world + gathered, grads // world
    opt_state, opt_tmp = adam["state"] // world, adam["transient"] // world
    loss_cfg = cfg.loss
    chunks = (
        int(loss_cfg.get("num_chunks", 4)) if "LinearCrossEntropy" in loss_cfg._component_ else None
    )
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shapes = [F.layer_shape(layer) for layer in model.layers]
    out_grads = sum(
        p.numel() * p.element_size() for p in model.output.parameters() if p.requires_grad
    )

    per_layer: List[int] = []  # the kept tensors' sizes, for the heaviest micro-batch

    def step_costs(mb: MicroBatch) -> Tuple[int, int, int, int]:
        kept, recompute, rg = 0, 0, model.tok_embeddings.weight.requires_grad
        per_layer.clear()
        for s in shapes:
            k, r = F.layer_activation_bytes(s, mb.tokens, itemsize, rg, ac, mb.by_document)
            kept, recompute = kept + k, max(recompute, r)
            per_layer.extend(_holes(s, k, mb.tokens, itemsize, ac))
            rg = True
        head = F.head_activation_bytes(model, mb.tokens, mb.scored, itemsize, chunks)
        d, h = shapes[0].dim, shapes[0].hidden_dim
        # One layer's backward: the MLP's [n, hidden] gradients (grad * b, silu's gradient,
        # grad * silu(a), silu(a)) and a few [n, d] ones, plus what checkpointing rebuilds.
        bwd = mb.tokens * (4 * h + 4 * d) * itemsize + recompute
        return kept + head["kept"], head["logits"], bwd, mb.tokens

    multi_step = len(inp.steps) > 1
    accum = max(len(s) for s in inp.steps)
    heaviest = max((mb for s in inp.steps for mb in s), key=lambda mb: (mb.tokens, mb.scored))
    acts, logits, bwd, _ = step_costs(heaviest)
    cpu = inp.device == "cpu"
    plain_acts = acts
    if cpu and quantized:
        # glibc's default heap (the QLoRA recipes keep it): the per-layer dequantized weights
        # are freed between saved activations, and the holes they leave below the top of
        # the heap stay resident. Modelled as every activation byte costing two: calibrated
        # on the ``small`` QLoRA runs of benchmarks/plan_accuracy.py, not derived. The save
        # that follows reuses those holes (its weights go where they were).
        acts *= 2
    o_live = opt_state if multi_step else 0
    g_prev = grads if accum > 1 else 0
    # Under the retained heap a later step's optimizer temporaries do not fit the pieces that
    # step 1's left, now carved up by activations and gradients: they extend the heap again
    # (small full fine-tune: +154 MiB at step 2's optimizer.step for 187 MiB of temporaries).
    retained = cpu and not quantized
    fused = bool(opt_cfg.get("fused", False))
    opt_again = opt_tmp if (multi_step and retained and not fused) else 0

    def moments_for(acts: int) -> Dict[str, int]:
        return {
            "forward (loss)": params + o_live + g_prev + acts + logits,
            "backward start": params + o_live + g_prev + acts + out_grads // world + bwd,
            "backward end": params + o_live + grads + bwd,
            "optimizer step": params + grads + opt_state + opt_tmp + opt_again,
        }

    moments = moments_for(acts)
    when = max(moments, key=moments.get)
    train_peak = moments[when]
    step_note = "step 2" if multi_step else "step 1"
    # Setup: the model and the checkpoint's (touched, file-backed) tensors at once.
    ckpt = inp.checkpoint // world if world > 1 else inp.checkpoint
    setup = params + ckpt
    save_sizes = [n // world for n in _save_allocations(model, quantized, itemsize)]
    save_total = sum(save_sizes)
    # Retained heap: the save's weights first fill the holes training's activations left
    # (each kept tensor's), and only what does not fit extends the heap.
    save_new = _unplaced(save_sizes, per_layer) if retained else save_total
    phases = {
        "setup": setup,
        "train": train_peak,
        "save": max(moments_for(plain_acts).values()) + save_new,
    }
    components = {
        **{f"parameters[{k}]": v // world for k, v in sorted(by_dtype.items())},
        "gradients": grads,
        "optimizer state": opt_state,
        "optimizer step temporaries": opt_tmp,
        "activations (kept)": acts,
        "loss logits buffer": logits,
        "backward transient": bwd,
        "checkpoint (setup)": ckpt,
        "FSDP gathered layers": gathered,
        "save: merged weights": save_total,
    }
    setup_runtime, runtime = inp.runtime
    if inp.device == "cuda":
        expandable = True
        setup_runtime = runtime = _CUDA_CONTEXT
        phases = {k: int(v * (1 + _CUDA_FRAGMENTATION[expandable])) for k, v in phases.items()}
        # The checkpoint is read to host memory, not the GPU.
        phases["setup"] = int(params * (1 + _CUDA_FRAGMENTATION[expandable]))
    phases = {k: v + (setup_runtime if k == "setup" else runtime) for k, v in phases.items()}
    components["runtime"] = setup_runtime if max(phases, key=phases.get) == "setup" else runtime
    peak_phase = max(phases, key=phases.get)
    where = {"setup": "setup (checkpoint loaded into the model)",
             "train": f"train, {step_note}: {when} of the heaviest micro-batch "
                      f"({heaviest.tokens} tokens, {heaviest.scored} scored)",
             "save": "save (merged weights built next to the trained model)"}  # fmt: skip
    notes = [f"{len(inp.steps)} optimizer steps of {accum} micro-batch(es)"]
    return Plan(phases, components, peak_phase, where[peak_phase], notes)


def _holes(s: F.LayerShape, kept: int, n: int, itemsize: int, ac: Any) -> List[int]:
    """Approximate sizes of one layer's kept tensors: its ``[n, hidden]`` ones (SwiGLU's two
    inputs, w2's input when trained, w1's and w3's outputs under selective checkpointing),
    the rest as ``[n, d]`` pieces."""
    big, small = n * s.hidden_dim * itemsize, n * s.dim * itemsize
    count = 0 if ac == "full" else 2 + int(s.trained["w2"] or s.rank["w2"] > 0)
    count += 2 if ac == "selective" else 0
    count = min(count, kept // max(big, 1))
    return [big] * count + [small] * ((kept - count * big) // max(small, 1))


def _unplaced(sizes: List[int], holes: List[int]) -> int:
    """Bytes of ``sizes`` that do not fit, first-fit and largest first, into ``holes``."""
    free = sorted(holes, reverse=True)
    left = 0
    for size in sorted(sizes, reverse=True):
        for i, hole in enumerate(free):
            if hole >= size:
                free[i] -= size
                break
        else:
            left += size
    return left


def _save_allocations(model: torch.nn.Module, quantized: bool, itemsize: int) -> List[int]:
    """New tensors the LoRA recipes' save builds: a merged weight per LoRA layer (and, with
    a quantized base, its dequantized weight in the state dict too), plus the two fp32
    temporaries of the largest fold (``B @ A`` and its scaled copy)."""
    sizes, largest = [], 0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            sizes += [m.out_dim * m.in_dim * itemsize] * (2 if quantized else 1)
            largest = max(largest, m.out_dim * m.in_dim * 4)
    return sizes + ([largest, largest] if largest else [])
