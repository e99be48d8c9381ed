# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Sequence log-probabilities of a batch of chosen and rejected responses, in one forward."""

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules import SharedPrefixMask, TransformerDecoder
from torchtune.training._next_token_loss import drop_unscored_tails


def sequence_logps(
    model: nn.Module, batch: Dict[str, Any], device: torch.device, *, pairs: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's scored tokens, and their counts.

    As in supervised training, logits at ``t`` score ``labels[:, t + 1]``, only the scored
    positions get logits (``output_mask``), and each row's tokens after its last scored one
    (padding) are dropped before the model runs, so the rows go through padding-free
    (:func:`~torchtune.training._next_token_loss.drop_unscored_tails`). The log-softmax is
    computed in fp32.

    With ``pairs``, row ``i`` and row ``i + n / 2`` (a pair collate's chosen and rejected
    answer) begin with the same prompt: the tokens they share go through the model once
    (:class:`~torchtune.modules.SharedPrefixMask`), each answer attending to that prompt as it
    would in its own row. Same log-probabilities and gradients (up to float rounding), a
    third less work for prompts as long as their answers.

    Args:
        model: a ``TransformerDecoder`` (or a wrapper whose forward takes the same arguments).
        batch: ``tokens`` and ``labels`` ``[n, s]`` (a pair collate gives the ``b`` chosen rows
            then the ``b`` rejected ones, ``n = 2b``).
        device: where the model is.
        pairs: share the common prefix of each chosen / rejected pair of rows.

    Returns:
        ``(logps, lengths)``: ``[n]`` fp32 sums of the scored tokens' log-probabilities, and
        ``[n]`` long counts of those tokens.
    """
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    n, s = tokens.shape
    no_label = torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)
    targets = torch.cat([labels[:, 1:], no_label], dim=1)  # [n, s]: the label after t
    scored = targets != CROSS_ENTROPY_IGNORE_IDX
    rows = torch.arange(n, device=device).repeat_interleave(s)[scored.flatten()]  # [m]
    picked = targets[scored]  # [m], in row-major order, which the unpadding keeps
    shared = _shared_prefix_layout(model, tokens, scored) if pairs else None
    if shared is not None:
        flat, where = shared
        hidden = model(
            flat["tokens"], mask=flat["mask"], input_pos=flat["input_pos"], return_hidden=True
        )  # [1, N, d]
        logits = model.output(hidden.flatten(0, 1)[where])  # [m, vocab]
        softcap = getattr(model, "output_softcap", None)
        if softcap is not None:  # as the model's forward applies it
            logits = torch.tanh(logits / softcap) * softcap
    else:
        inputs = {"tokens": tokens, "mask": None, "input_pos": None}
        out_mask = scored
        if isinstance(model, TransformerDecoder):
            unpadded = drop_unscored_tails({"tokens": tokens}, scored)
            if unpadded is not None:
                inputs, keep = unpadded
                out_mask = scored.flatten()[keep].unsqueeze(0)
        logits = model(
            inputs["tokens"],
            mask=inputs["mask"],
            input_pos=inputs["input_pos"],
            output_mask=out_mask,
        )  # [m, vocab]
    token_logps = -F.cross_entropy(logits.float(), picked, reduction="none")  # [m]
    logps = torch.zeros(n, device=device, dtype=torch.float32).index_add(0, rows, token_logps)
    return logps, scored.sum(dim=1)


def _shared_prefix_layout(
    model: nn.Module, tokens: torch.Tensor, scored: torch.Tensor
) -> Optional[Tuple[Dict[str, Any], torch.Tensor]]:
    """The pairs of ``tokens`` as one row of ``[prompt, chosen, rejected]`` groups.

    Each row is cut after its last scored position; the shared prefix of a pair is their
    common tokens, short of the shorter row's last position (each answer keeps a token).

    Returns:
        ``({"tokens", "input_pos": [1, N], "mask": SharedPrefixMask}, where)``, ``where``
        ``[m]`` indexing the ``N`` positions at the scored positions of ``scored`` in
        row-major order (the last prompt position appears once per answer), or None where
        sharing does not apply: not a ``TransformerDecoder``, one with sliding-window layers
        or caches on, an odd number of rows, or a row with nothing scored.
    """
    n, s = tokens.shape
    if not isinstance(model, TransformerDecoder) or n % 2 or model.caches_are_enabled():
        return None
    if any(getattr(layer.attn, "sliding_window", None) is not None for layer in model.layers):
        return None
    pos = torch.arange(s, device=tokens.device)
    last = torch.where(scored, pos, -1).amax(dim=1)  # [n]
    b = n // 2
    same = tokens[:b] == tokens[b:]  # [b, s]
    # Common prefix length: the first position where the pair differs (s if none).
    lcp = torch.where(~same, pos, s).amin(dim=1)  # [b]
    stats = torch.cat([last, lcp]).tolist()  # one sync
    lens, lcp = [x + 1 for x in stats[:n]], stats[n:]
    if min(lens) < 1:
        return None
    index: List[torch.Tensor] = []  # flat [n * s] source index of each laid-out token
    input_pos: List[torch.Tensor] = []
    groups = []
    starts = []  # per row: (layout start of prefix, prefix length, layout start of its branch)
    cursor = 0
    for i in range(b):
        c, r = i, i + b
        p = min(lcp[i], lens[c] - 1, lens[r] - 1)
        groups.append((p, lens[c] - p, lens[r] - p))
        index += [c * s + pos[: lens[c]], r * s + pos[p : lens[r]]]
        input_pos += [pos[: lens[c]], pos[p : lens[r]]]
        starts.append((c, cursor, p, cursor + p))
        starts.append((r, cursor, p, cursor + lens[c]))
        cursor += lens[c] + lens[r] - p
    flat_index = torch.cat(index)
    flat = {
        "tokens": tokens.flatten()[flat_index].unsqueeze(0),
        "input_pos": torch.cat(input_pos).unsqueeze(0),
        "mask": SharedPrefixMask(tuple(groups)),
    }
    # Layout position of every (row, t): prefix positions map into the group's prefix, the
    # rest into the row's own branch.
    layout = torch.zeros(n, s, dtype=torch.long, device=tokens.device)
    for row, start, p, branch in sorted(starts):
        layout[row] = torch.where(pos < p, start + pos, branch + pos - p)
    return flat, layout[scored]
