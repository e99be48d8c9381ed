# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Output projection and token cross-entropy in one pass over chunks: no full logits, ever."""
from typing import List, Optional, Tuple

import torch
from torch import nn


def _chunk_loss_and_logit_grad(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, want_grad: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Summed CE of ``[c, vocab]`` logits (fp32 math) and, if asked, d(sum)/d(logits)."""
    logits32 = logits.detach().float()  # in fp32 the same tensor: edited in place below
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits32, dim=-1)  # [c]
    picked = logits32.gather(1, targets.unsqueeze(1)).squeeze(1)  # [c]
    loss = torch.where(valid, lse - picked, 0.0).sum()
    if not want_grad:
        return loss, None
    # d(lse - logit_t)/d(logits) = softmax - onehot(t); rows without a label get zero.
    grad = logits32.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, targets.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
    grad.mul_(valid.unsqueeze(1))
    return loss, grad.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of CE(projection(hidden), labels); gradients are computed chunk by chunk in forward.

    Each chunk's logits live only while that chunk is scored: forward takes the gradient of
    the chunk's loss with respect to its logits right away (softmax - onehot, in place) and
    pushes it through ``projection`` with ``torch.autograd.grad``, keeping only the gradients
    of ``hidden`` (``[n, d]``) and of the projection's trainable parameters. Backward scales
    them by the incoming gradient. Same FLOPs as the unfused path, no recompute.
    """

    @staticmethod
    def forward(ctx, hidden, labels, projection, num_chunks, ignore_index, *params):
        want_hidden, want_params = ctx.needs_input_grad[0], any(ctx.needs_input_grad[5:])
        want_grad = want_hidden or want_params
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Parameter gradients summed over chunks in fp32, cast once at the end.
        grad_params: List[torch.Tensor] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        start = 0
        for h_chunk, label_chunk in zip(hidden.chunk(num_chunks), labels.chunk(num_chunks)):
            with torch.enable_grad():
                h_leaf = h_chunk.detach().requires_grad_(want_hidden)
                logits = projection(h_leaf)  # [c, vocab]
            loss, grad_logits = _chunk_loss_and_logit_grad(
                logits, label_chunk, ignore_index, want_grad
            )
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
    scored tokens, like ``ChunkedCrossEntropyLoss``.

    Args:
        num_chunks: pieces the rows are split into.
        ignore_index: label value that is not scored.

    Raises:
        ValueError: if ``num_chunks`` is not positive.
    """

    def __init__(self, num_chunks: int = 8, ignore_index: int = -100) -> None:
        super().__init__()
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        self.num_chunks = num_chunks
        self.ignore_index = ignore_index

    def forward(
        self, hidden: torch.Tensor, projection: nn.Module, labels: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden: ``[n, d]`` (or ``[b, s, d]``) inputs of ``projection``, aligned with
                ``labels``.
            projection: maps ``[c, d]`` to ``[c, vocab]`` logits (e.g. ``model.output``).
            labels: ``LongTensor[n]`` (or ``[b, s]``); ``ignore_index`` entries are skipped.

        Returns:
            ``(loss_sum, num_tokens)``: fp32 scalar sum of the per-token losses and a long
            scalar count of the scored tokens.

        Raises:
            ValueError: if the shapes disagree.
        """
        if hidden.shape[:-1] != labels.shape:
            raise ValueError(
                f"hidden must be labels' shape plus a feature dim; got {tuple(hidden.shape)} "
                f"and {tuple(labels.shape)}"
            )
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [n, d]
        labels = labels.reshape(-1)
        num_tokens = (labels != self.ignore_index).sum()
        if not torch.is_grad_enabled():
            total = hidden.new_zeros((), dtype=torch.float32)
            for h_chunk, label_chunk in zip(
                hidden.chunk(self.num_chunks), labels.chunk(self.num_chunks)
            ):
                total += _chunk_loss_and_logit_grad(
                    projection(h_chunk), label_chunk, self.ignore_index, want_grad=False
                )[0]
            return total, num_tokens
        params = [p for p in projection.parameters() if p.requires_grad]
        total = _LinearCrossEntropy.apply(
            hidden, labels, projection, self.num_chunks, self.ignore_index, *params
        )
        return total, num_tokens
