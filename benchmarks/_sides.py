# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The two sides of ``benchmarks/finetune.py``: our recipe's training step and a plain HF loop.

Ours is built from the library pieces the single-device recipes use (the model builder through
``config.instantiate``, ``peft.set_trainable_params``, ``utils.apply_activation_checkpointing``)
and stepped by ``training.optimizer_step``, the recipes' step, so the benchmark times the code
``tune`` runs. The levers that are not config keys of the recipe yet (eager attention, frozen
weights that still get gradients) are applied to the built model here.
"""

import contextlib
import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from torchtune import config, training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate
from torchtune.datasets._packed import PackedDataset
from torchtune.models.llama2 import llama2, tune_to_hf, tune_to_peft_adapter_weights
from torchtune.modules import attention as attention_module
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.training import _next_token_loss as next_token_loss_module

# Llama2 shapes. ``small`` is the CPU target; ``7b`` is for CUDA in bf16;
# ``small_llama3`` is ``small`` with Llama 3's attention: 4 KV heads for 12 query heads (GQA)
# and its RoPE (theta 500000, ``llama3`` frequency scaling; see ``ROPE``). Its vocabulary stays
# 32000: Llama 3's 128256 would make the output layer most of a CPU-sized model.
# ``llama3_8b`` is Llama 3.1 8B's full shape (vocabulary included), for CUDA in bf16.
# ``llama3_2_1b`` is Llama 3.2 1B's shape (16 layers, dim 2048, 32 / 8 heads of 64, FFN 8192,
# its llama3 RoPE) with the vocabulary cut from 128256 to 32000 and the output untied, to keep
# it CPU-sized: the QLoRA memory target's model.
SHAPES: Dict[str, Dict[str, int]] = {
    "tiny": dict(
        vocab_size=1000,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        embed_dim=128,
        intermediate_dim=352,
    ),
    "small": dict(
        vocab_size=32_000,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        embed_dim=768,
        intermediate_dim=2048,
    ),
    "7b": dict(
        vocab_size=32_000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        embed_dim=4096,
        intermediate_dim=11008,
    ),
    "tiny_llama3": dict(
        vocab_size=1000,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=128,
        intermediate_dim=352,
    ),
    "small_llama3": dict(
        vocab_size=32_000,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        embed_dim=768,
        intermediate_dim=2048,
    ),
    "llama3_8b": dict(
        vocab_size=128_256,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        intermediate_dim=14336,
    ),
    "llama3_2_1b": dict(
        vocab_size=32_000,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=2048,
        intermediate_dim=8192,
    ),
}
# Rotary settings of a shape (Llama 2's theta 10000 and no scaling when absent).
_LLAMA3_ROPE = dict(
    rope_base=500_000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
ROPE: Dict[str, Dict] = {
    "tiny_llama3": _LLAMA3_ROPE,
    "small_llama3": _LLAMA3_ROPE,
    "llama3_8b": _LLAMA3_ROPE,
    "llama3_2_1b": {
        **_LLAMA3_ROPE,
        "rope_scaling": {**_LLAMA3_ROPE["rope_scaling"], "factor": 32.0},
    },
}
LORA = dict(lora_attn_modules=["q_proj", "v_proj"], lora_rank=8, lora_alpha=16.0)
# Methods with a LoRA adapter: ``qlora`` is LoRA over a base whose decoder-layer linears are
# NF4 (blocks of 64, double-quantized scales): ours ``quantize_base=True``, the reference
# bitsandbytes' ``Linear4bit`` under PEFT.
LORA_METHODS = ("lora", "qlora")
ADAMW = dict(lr=2e-5, weight_decay=0.01)
PAD_ID = 0
IGNORE = CROSS_ENTROPY_IGNORE_IDX


@dataclass
class Levers:
    """Our side's speed/memory levers (the reference always runs as a plain HF loop).

    Attributes:
        data: ``packed`` (PackedDataset rows), ``grouped`` (length-sorted within a window) or
            ``padded`` (batches in order, padded to their longest sample).
        loss: ``linear`` (LinearCrossEntropyLoss: output projection + CE fused),
            ``chunked`` (ChunkedCrossEntropyLoss over full logits) or ``plain`` (one
            fp32 CE over full logits).
        ce_chunks: ``num_chunks`` of the ``linear`` and ``chunked`` losses.
        frozen: LoRA base weights have ``requires_grad=False`` (else they get gradients too).
        optim: AdamW implementation: ``loop`` (foreach=False), ``foreach`` or ``fused``.
        attn: ``sdpa`` (packed rows: causal SDPA per document), ``dense`` (SDPA with a
            dense block-causal mask built from the document lengths) or ``eager``
            (softmax(QK^T)V written out, dense mask).
        ac: the recipes' ``enable_activation_checkpointing``: ``False``, ``True`` (whole
            layers) or ``"selective"`` (keep matmul/attention outputs, recompute the rest).
        compile: ``torch.compile`` of every decoder layer.
        drop_unscored: the recipes' loss drops each document's unscored tail (padding)
            before the model runs; False runs the padded batch as it is.
        cpu_heap: ``retain`` (``utils.retain_freed_cpu_memory()``, what the recipes do on CPU)
            or ``default`` (glibc's malloc defaults). Process-wide: the reference in the same
            process runs under it too, and the lever is measured in fresh processes.
    """

    data: str = "packed"
    loss: str = "linear"
    ce_chunks: int = 4
    frozen: bool = True
    optim: str = "foreach"
    attn: str = "sdpa"
    ac: Union[bool, str] = False
    compile: bool = False
    drop_unscored: bool = True
    cpu_heap: str = "retain"

    def to_dict(self) -> Dict:
        return asdict(self)


def apply_cpu_heap(cpu_heap: str, device: torch.device) -> None:
    """Set this process's malloc behaviour (``Levers.cpu_heap``) before any tensor work."""
    from torchtune.utils import retain_freed_cpu_memory

    if cpu_heap not in ("retain", "default"):
        raise ValueError(f"cpu_heap must be retain or default; got {cpu_heap!r}")
    if cpu_heap == "retain" and device.type == "cpu":
        retain_freed_cpu_memory()


def non_embedding_params(shape: str) -> int:
    """Parameters that do matmul FLOPs per token: all but the embedding table (a lookup)."""
    s = SHAPES[shape]
    d, h, v, n_l = s["embed_dim"], s["intermediate_dim"], s["vocab_size"], s["num_layers"]
    head_dim = d // s["num_heads"]
    attn = d * d * 2 + 2 * d * s["num_kv_heads"] * head_dim
    per_layer = attn + 3 * d * h + 2 * d
    return n_l * per_layer + d + v * d


def make_weights(shape: str, method: str, seed: int, device: str, dtype: torch.dtype):
    """Random base weights (native keys) and, for LoRA, an adapter with a random ``lora_a``.

    ``lora_b`` is random too (not PEFT's zero init), so the adapter changes the loss and a
    parity check of the two sides covers it.
    """
    torch.manual_seed(seed)
    max_seq_len = 4096
    with torch.device(device):
        base = llama2(**SHAPES[shape], **ROPE.get(shape, {}), max_seq_len=max_seq_len).to(dtype)
    weights = {k: v.detach() for k, v in base.state_dict().items()}
    del base
    adapter = None
    if method in LORA_METHODS:
        s = SHAPES[shape]
        r, d = LORA["lora_rank"], s["embed_dim"]
        out = {"q_proj": d, "v_proj": s["num_kv_heads"] * (d // s["num_heads"])}
        adapter = {}
        for i in range(s["num_layers"]):
            for name in LORA["lora_attn_modules"]:
                p = f"layers.{i}.attn.{name}."
                adapter[p + "lora_a.weight"] = (torch.randn(r, d, device=device) / math.sqrt(d)).to(
                    dtype
                )
                adapter[p + "lora_b.weight"] = (torch.randn(out[name], r, device=device) * 0.01).to(
                    dtype
                )
    return weights, adapter


# ---------------------------------------------------------------- data


def make_batches(
    samples: List[Dict[str, List[int]]], data: str, batch_size: int, max_seq_len: int
) -> List[Dict[str, torch.Tensor]]:
    """Batches of ``samples`` for one side: see :class:`Levers` ``data``; ``hf`` = ``padded`` plus
    HF's ``attention_mask``.

    Returns:
        Batches from ``padded_collate``: ``tokens``/``labels`` ``[b, s]`` (packed: also
        ``input_pos`` ``[b, s]`` and ``mask``, a ``DocumentMask``; hf: ``attention_mask``
        ``[b, s]``).
    """
    if data in ("padded", "hf"):
        rows = list(samples)
    elif data == "grouped":
        rows = sorted(samples, key=lambda x: len(x["tokens"]))
    elif data == "packed":
        packed = PackedDataset(samples, max_seq_len=max_seq_len, padding_idx=PAD_ID)
        rows = [packed[i] for i in range(len(packed))]
    else:
        raise ValueError(f"data must be packed, grouped, padded or hf; got {data!r}")
    batches = []
    for i in range(0, len(rows), batch_size):
        batch = padded_collate(rows[i : i + batch_size], padding_idx=PAD_ID)
        if data == "hf":
            # Sample ids never include PAD_ID (the generator starts at 3, bos=1, eos=2).
            batch["attention_mask"] = (batch["tokens"] != PAD_ID).long()
        batches.append(batch)
    return batches


def count_tokens(batch: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """``real`` (non-padding) and ``all`` tokens of a batch."""
    return {"real": int((batch["tokens"] != PAD_ID).sum()), "all": batch["tokens"].numel()}


# ---------------------------------------------------------------- ours


class PlainCrossEntropy(nn.Module):
    """The recipe's loss interface (``(sum, count)``) over one fp32 CE of the whole batch."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        flat = logits.reshape(-1, logits.shape[-1]).float()  # [b*s, vocab]: all of it in fp32
        loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        return loss, (labels != IGNORE).sum()


def _eager_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
    # q, k, v: [b, n, s, h_d]; the textbook softmax(QK^T / sqrt(d)) V, materialising [b, n, s, s].
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        s_q, s_k = q.shape[-2], k.shape[-2]
        attn_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:  # additive (what the decoder passes its layers)
        scores = scores + attn_mask
    probs = F.dropout(scores.softmax(-1), p=dropout_p)
    return probs @ v


@contextlib.contextmanager
def eager_attention():
    """Swap our attention's SDPA call for ``_eager_sdpa`` (our module only; HF is untouched)."""
    saved = attention_module.F
    attention_module.F = SimpleNamespace(scaled_dot_product_attention=_eager_sdpa)
    try:
        yield
    finally:
        attention_module.F = saved


def _dense_attention_by_document(q, k, v, mask, dropout_p, window=None):
    # q: [b, s, n_h, h_d], k/v: [b, s, n_kv, h_d]; the block-causal mask built from the
    # document lengths, dense, and handed to SDPA as one [b, 1, s, s] mask.
    b, s, n_h, h_d = q.shape
    docs = mask.document_ids(q.device).view(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if window is not None:  # documents are contiguous: row offsets are document offsets
        causal = causal & ~torch.ones(s, s, dtype=torch.bool, device=q.device).tril(-window)
    dense = (docs[:, :, None] == docs[:, None, :]) & causal  # [b, s, s]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, n, s, h_d]
    if k.shape[1] != n_h:
        k = k.repeat_interleave(n_h // k.shape[1], dim=1)
        v = v.repeat_interleave(n_h // v.shape[1], dim=1)
    out = attention_module.F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense.unsqueeze(1), dropout_p=dropout_p
    )  # [b, n_h, s, h_d]
    return out.transpose(1, 2).reshape(b, s, n_h * h_d)


@contextlib.contextmanager
def dense_mask_attention():
    """Run packed rows' attention with a dense block-causal mask built from their document
    lengths: SDPA computes and discards the blocks between documents (what the decoder did
    before it ran attention per document). A batch flattened by the loss (``drop_unscored``)
    is one row, so its dense mask is ``[1, n, n]``; measure with ``drop_unscored=False`` for
    the old ``[b, s, s]`` cost."""
    saved = attention_module._attention_by_document
    attention_module._attention_by_document = _dense_attention_by_document
    try:
        yield
    finally:
        attention_module._attention_by_document = saved


@contextlib.contextmanager
def keep_unscored_tails():
    """Run batches as they come, padding included (what the loss did before it dropped them)."""
    saved = next_token_loss_module.drop_unscored_tails
    next_token_loss_module.drop_unscored_tails = lambda batch, scored: None
    try:
        yield
    finally:
        next_token_loss_module.drop_unscored_tails = saved


@contextlib.contextmanager
def _eager_dense_attention():
    with eager_attention(), dense_mask_attention():
        yield


def _optimizer_cfg(optim: str):
    impl = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    if optim not in impl:
        raise ValueError(f"optim must be loop, foreach or fused; got {optim!r}")
    return OmegaConf.create({"_component_": "torch.optim.AdamW", **ADAMW, **impl[optim]})


def build_ours(
    shape: str,
    method: str,
    levers: Levers,
    weights: Dict,
    adapter: Optional[Dict],
    device: torch.device,
    dtype: torch.dtype,
) -> Callable[[Dict[str, torch.Tensor]], float]:
    """Our side, built from the library as the single-device recipes build it: the builder
    via ``config.instantiate``, the given weights loaded, LoRA's base frozen by
    ``set_trainable_params``, the optimizer over the trained parameters, the loss; stepped by
    ``training.optimizer_step``. Returns ``step(batch) -> loss``."""
    lora = method in LORA_METHODS
    component = "torchtune.models.llama2." + ("lora_llama2" if lora else "llama2")
    cfg_model = {
        "_component_": component,
        **SHAPES[shape],
        **ROPE.get(shape, {}),
        "max_seq_len": 4096,
    }
    if lora:
        cfg_model.update(LORA, lora_dropout=0.0, quantize_base=method == "qlora")
    with utils.set_default_dtype(dtype), device:
        model = config.instantiate(OmegaConf.create(cfg_model))
    if lora:  # qlora: each weight quantized as it is loaded
        model.load_state_dict({**weights, **adapter}, strict=True)
        trained = get_adapter_params(model)
        set_trainable_params(model, trained)
        if not levers.frozen:
            # The naive way: everything requires grad, only the adapters are optimized.
            for p in model.parameters():
                p.requires_grad_(True)
        params = list(trained.values())
    else:
        model.load_state_dict(weights, strict=True)
        params = list(model.parameters())
    utils.apply_activation_checkpointing(model, levers.ac)
    if levers.compile:
        utils.compile_layers(model)
    optimizer = config.instantiate(_optimizer_cfg(levers.optim), params)
    if levers.loss == "linear":
        loss_fn = training.LinearCrossEntropyLoss(levers.ce_chunks)
    elif levers.loss == "chunked":
        loss_fn = training.ChunkedCrossEntropyLoss(levers.ce_chunks)
    elif levers.loss == "plain":
        loss_fn = PlainCrossEntropy()
    else:
        raise ValueError(f"loss must be linear, chunked or plain; got {levers.loss!r}")
    attn_ctx = {
        "sdpa": contextlib.nullcontext,
        "dense": dense_mask_attention,
        "eager": _eager_dense_attention,
    }.get(levers.attn)
    if attn_ctx is None:
        raise ValueError(f"attn must be sdpa, dense or eager; got {levers.attn!r}")

    tails_ctx = contextlib.nullcontext if levers.drop_unscored else keep_unscored_tails

    def step(batch: Dict[str, torch.Tensor]) -> float:
        with attn_ctx(), tails_ctx():
            loss, _ = training.optimizer_step(
                model, loss_fn, optimizer, [batch], params=params, device=device
            )
        return loss

    step.model = model
    return step


# ---------------------------------------------------------------- reference


def _bnb_quantize_layers_(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Swap every linear layer of the HF decoder layers for bitsandbytes' ``Linear4bit``
    (NF4, blocks of 64, double-quantized scales, computing in ``dtype``), as
    ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` does,
    without writing the weights to disk first."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.detach(),
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                    blocksize=64,
                )
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, name, q.to(device))  # quantizes here


def build_hf(
    shape: str,
    method: str,
    weights: Dict,
    adapter: Optional[Dict],
    device: torch.device,
    dtype: torch.dtype,
    gradient_checkpointing: bool = False,
) -> Callable[[Dict[str, torch.Tensor]], float]:
    """A plain HF loop (``LlamaForCausalLM`` with its default SDPA attention, + PEFT LoRA on q/v,
    ``torch.optim.AdamW`` with its defaults but the same lr/weight decay); ``step(batch) -> loss``.
    ``gradient_checkpointing`` recomputes each decoder layer in backward (transformers'
    ``gradient_checkpointing_enable``, non-reentrant), as PEFT's QLoRA preparation
    (``prepare_model_for_kbit_training``) turns on by default.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["embed_dim"],
        intermediate_size=s["intermediate_dim"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=ROPE.get(shape, {}).get("rope_base", 10000.0),
        # A copy: LlamaConfig writes rope_theta into the dict it is given.
        rope_scaling=dict(ROPE[shape]["rope_scaling"]) if shape in ROPE else None,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(tune_to_hf(weights), strict=True)
    if method == "qlora":
        _bnb_quantize_layers_(model, device, dtype)
    if method in LORA_METHODS:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        lora_cfg = LoraConfig(
            r=LORA["lora_rank"],
            lora_alpha=LORA["lora_alpha"],
            lora_dropout=0.0,
            target_modules=LORA["lora_attn_modules"],
            bias="none",
        )
        model = get_peft_model(model, lora_cfg)
        peft_sd = tune_to_peft_adapter_weights(adapter)
        result = set_peft_model_state_dict(model, peft_sd)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"PEFT adapter keys not loaded: {result.unexpected_keys[:4]}")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)

    def step(batch: Dict[str, torch.Tensor]) -> float:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(
            input_ids=batch["tokens"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    step.model = model
    return step
