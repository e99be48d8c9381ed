# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Output projection and token cross-entropy in one pass over chunks: no full logits, ever."""

from typing import List, Optional, Tuple

import torch
from torch import nn

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX


def _chunk_loss_and_logit_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    want_grad: bool,
    softcap: Optional[float] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Summed CE of ``[c, vocab]`` logits (fp32 math) and, if asked, d(sum)/d(logits).

    fp32 logits are overwritten (they become the gradient): every step is in place, because a
    fresh ``[c, vocab]`` temporary per chunk (``torch.logsumexp`` makes one) costs more in page
    faults on CPU than the arithmetic. With ``softcap`` the CE is of
    ``softcap * tanh(logits / softcap)`` (in fp32), and its gradient is carried back through
    the cap (``1 - tanh^2``, one more ``[c, vocab]`` buffer).
    """
    logits32 = logits.detach().float()  # in fp32 the same tensor: edited in place below
    slope = None
    if softcap is not None:
        tanh = logits32.div_(softcap).tanh_()
        if want_grad:
            slope = tanh.square().neg_().add_(1.0)  # d capped / d logits, [c, vocab]
        logits32 = tanh.mul_(softcap)
    valid = labels != CROSS_ENTROPY_IGNORE_IDX
    targets = torch.where(valid, labels, 0)
    picked = logits32.gather(1, targets.unsqueeze(1)).squeeze(1)  # [c]
    row_max = logits32.amax(dim=-1, keepdim=True)  # [c, 1]
    exp = logits32.sub_(row_max).exp_()  # exp(logit - max), [c, vocab]
    sum_exp = exp.sum(dim=-1)  # [c]
    lse = sum_exp.log() + row_max.squeeze(1)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    if not want_grad:
        return loss, None
    # d(lse - logit_t)/d(logits) = softmax - onehot(t); rows without a label get zero.
    grad = exp.mul_((valid / sum_exp).unsqueeze(1))
    grad.scatter_add_(1, targets.unsqueeze(1), -valid.to(grad.dtype).unsqueeze(1))
    if slope is not None:
        grad.mul_(slope)
    return loss, grad.to(logits.dtype)


def _plain_linear(projection: nn.Module) -> bool:
    """Whether ``projection`` is exactly ``x @ weight.T (+ bias)`` with no hooks to honour,
    so its matmuls can be written out (into reused buffers) instead of traced by autograd."""
    return (
        isinstance(projection, nn.Linear)
        and type(projection).forward is nn.Linear.forward
        and not (projection._forward_pre_hooks or projection._forward_hooks)
    )


def _linear_chunks(h_chunks, label_chunks, linear, grad_hidden, grad_params, softcap):
    """Chunk loop for a plain ``nn.Linear``: matmuls written out, one logits buffer reused.

    ``grad_hidden`` (or None) is filled row by row; ``grad_params`` are the fp32 sums for the
    linear's trainable parameters in ``parameters()`` order (weight, then bias).
    """
    weight, bias = linear.weight, linear.bias
    trainable = [p for p in (weight, bias) if p is not None and p.requires_grad]
    acc = dict(zip(map(id, trainable), grad_params))
    want_grad = grad_hidden is not None or bool(trainable)
    rows = max(c.shape[0] for c in h_chunks)
    buffer = h_chunks[0].new_empty((rows, weight.shape[0]))
    total = h_chunks[0].new_zeros((), dtype=torch.float32)
    start = 0
    for h_chunk, label_chunk in zip(h_chunks, label_chunks):
        end = start + h_chunk.shape[0]
        out = buffer[: end - start]  # [c, vocab]
        if bias is None:
            logits = torch.mm(h_chunk, weight.t(), out=out)
        else:  # one rounding, like F.linear
            logits = torch.addmm(bias, h_chunk, weight.t(), out=out)
        loss, grad_logits = _chunk_loss_and_logit_grad(logits, label_chunk, want_grad, softcap)
        total += loss
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if id(weight) in acc:
            _accumulate_mm(acc[id(weight)], grad_logits.t(), h_chunk)
        if bias is not None and id(bias) in acc:
            acc[id(bias)] += grad_logits.sum(dim=0, dtype=torch.float32)
        start = end
    return total


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` without a weight-sized temporary when the dtypes allow it."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:  # low-precision matmul (as autograd would do it), summed in fp32
        acc += a @ b


def _module_chunks(h_chunks, label_chunks, projection, grad_hidden, params, grad_params, softcap):
    """Chunk loop for any projection module (e.g. LoRA): gradients by ``autograd.grad``."""
    want_hidden = grad_hidden is not None
    want_grad = want_hidden or bool(params)
    total = h_chunks[0].new_zeros((), dtype=torch.float32)
    start = 0
    for h_chunk, label_chunk in zip(h_chunks, label_chunks):
        with torch.enable_grad():
            h_leaf = h_chunk.detach().requires_grad_(want_hidden)
            logits = projection(h_leaf)  # [c, vocab]
        loss, grad_logits = _chunk_loss_and_logit_grad(logits, label_chunk, want_grad, softcap)
        total += loss
        if want_grad:
            inputs = ([h_leaf] if want_hidden else []) + list(params)
            grads = torch.autograd.grad(logits, inputs, grad_logits, allow_unused=True)
            if want_hidden:
                grad_hidden[start : start + h_chunk.shape[0]] = grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_params, grads):
                if g is not None:
                    acc += g
        start += h_chunk.shape[0]
        del logits, grad_logits
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of CE(projection(hidden), labels); gradients are computed chunk by chunk in forward.

    Each chunk's logits live only while that chunk is scored: forward takes the gradient of
    the chunk's loss with respect to its logits right away (softmax - onehot, in place) and
    pushes it through ``projection`` with ``torch.autograd.grad``, keeping only the gradients
    of ``hidden`` (``[n, d]``) and of the projection's trainable parameters. Backward scales
    them by the incoming gradient. Same FLOPs as the unfused path, no recompute.
    """

    @staticmethod
    def forward(ctx, hidden, labels, projection, num_chunks, softcap, *params):
        want_hidden = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Parameter gradients summed over chunks in fp32, cast once at the end.
        grad_params: List[torch.Tensor] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        h_chunks, label_chunks = hidden.chunk(num_chunks), labels.chunk(num_chunks)
        if _plain_linear(projection):
            total = _linear_chunks(
                h_chunks, label_chunks, projection, grad_hidden, grad_params, softcap
            )
        else:
            total = _module_chunks(
                h_chunks, label_chunks, projection, grad_hidden, params, grad_params, softcap
            )
        ctx.save_for_backward(
            *([grad_hidden] if want_hidden else []),
            *[g.to(p.dtype) for g, p in zip(grad_params, params)],
        )
        ctx.want_hidden = want_hidden
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) if ctx.want_hidden else None
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        grad_params = [g * grad_total.to(g.dtype) for g in saved]
        return (grad_hidden, None, None, None, None, *grad_params)


class LinearCrossEntropyLoss(nn.Module):
    """Summed token cross-entropy of ``projection(hidden)``, never holding a batch's logits.

    Where :class:`ChunkedCrossEntropyLoss` takes logits, this takes the hidden states before
    the output projection and the projection itself (``model.output``, a plain or LoRA
    linear layer), and runs projection + fp32 cross-entropy one chunk of rows at a time. With
    gradients on, each chunk's gradients are taken in the forward pass, so neither the
    ``[n, vocab]`` logits nor their gradient ever exist in full (about 2 x 240 MiB for 1900
    tokens at vocab 32000 in fp32) and nothing is recomputed. Returns the sum and the count of
    scored tokens, like ``ChunkedCrossEntropyLoss``; labels equal to
    ``torchtune.data.CROSS_ENTROPY_IGNORE_IDX`` are not scored.

    Args:
        num_chunks: pieces the rows are split into. Fewer pieces mean larger output-projection
            matmuls that run nearer the GEMM peak, more pieces a smaller logits buffer
            (``rows / num_chunks x vocab``); 4 was faster than 8 at no measurable cost in
            peak memory (``benchmarks/``, lever ``ce_chunks``).

    Raises:
        ValueError: if ``num_chunks`` is not positive.
    """

    def __init__(self, num_chunks: int = 4) -> None:
        super().__init__()
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        self.num_chunks = num_chunks

    def forward(
        self,
        hidden: torch.Tensor,
        projection: nn.Module,
        labels: torch.Tensor,
        *,
        softcap: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden: ``[n, d]`` (or ``[b, s, d]``) inputs of ``projection``, aligned with
                ``labels``.
            projection: maps ``[c, d]`` to ``[c, vocab]`` logits (e.g. ``model.output``).
            labels: ``LongTensor[n]`` (or ``[b, s]``); ``CROSS_ENTROPY_IGNORE_IDX`` entries are skipped.
            softcap: the model's final-logit cap (``TransformerDecoder.output_softcap``):
                scored are ``softcap * tanh(logits / softcap)``, as the model's own forward
                returns them. None: the logits as they are. The cap is taken in fp32 (the
                model's forward takes it in the logits' dtype, as transformers does): the
                same in fp32, a little more precise in bf16.

        Returns:
            ``(loss_sum, num_tokens)``: fp32 scalar sum of the per-token losses and a long
            scalar count of the scored tokens.

        Raises:
            ValueError: if the shapes disagree or ``softcap`` is not positive.
        """
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be positive or None, got {softcap}")
        if hidden.shape[:-1] != labels.shape:
            raise ValueError(
                f"hidden must be labels' shape plus a feature dim; got {tuple(hidden.shape)} "
                f"and {tuple(labels.shape)}"
            )
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [n, d]
        labels = labels.reshape(-1)
        num_tokens = (labels != CROSS_ENTROPY_IGNORE_IDX).sum()
        if not torch.is_grad_enabled():
            total = hidden.new_zeros((), dtype=torch.float32)
            for h_chunk, label_chunk in zip(
                hidden.chunk(self.num_chunks), labels.chunk(self.num_chunks)
            ):
                total += _chunk_loss_and_logit_grad(
                    projection(h_chunk), label_chunk, want_grad=False, softcap=softcap
                )[0]
            return total, num_tokens
        params = [p for p in projection.parameters() if p.requires_grad]
        total = _LinearCrossEntropy.apply(
            hidden, labels, projection, self.num_chunks, softcap, *params
        )
        return total, num_tokens
