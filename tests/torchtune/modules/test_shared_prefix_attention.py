# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``SharedPrefixMask``: a prefix once, then its branches, equal to each prefix + branch run
as its own causal row."""

import pytest
import torch

from torchtune.models.llama2 import llama2
from torchtune.modules import SharedPrefixMask

GROUPS = ((5, 3, 4), (0, 6, 2), (7, 1, 1, 2))  # an empty prefix, three branches


def _model(**kw):
    torch.manual_seed(0)
    model = llama2(
        vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=48,
        intermediate_dim=72, max_seq_len=32, **kw,
    )  # fmt: skip
    with torch.no_grad():  # norms off their init, so a dropped scale would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _layout(groups, g):
    """Random tokens for the groups: the laid-out row and each prefix + branch alone."""
    tokens, pos, rows, where = [], [], [], []
    for group in groups:
        prefix = torch.randint(3, 97, (group[0],), generator=g)
        tokens.append(prefix)
        pos.append(torch.arange(group[0]))
        start = sum(len(t) for t in tokens) - group[0]
        cursor = start + group[0]
        for n in group[1:]:
            branch = torch.randint(3, 97, (n,), generator=g)
            tokens.append(branch)
            pos.append(torch.arange(group[0], group[0] + n))
            rows.append(torch.cat([prefix, branch]))
            # where each position of this row sits in the layout
            where.append(
                torch.cat([torch.arange(start, start + group[0]), torch.arange(cursor, cursor + n)])
            )
            cursor += n
    return torch.cat(tokens)[None], torch.cat(pos)[None], rows, where


def test_shared_prefix_logits_equal_each_row_alone():
    model = _model()
    tokens, pos, rows, where = _layout(GROUPS, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens, mask=SharedPrefixMask(GROUPS), input_pos=pos)[0]  # [N, vocab]
        for row, idx in zip(rows, where):
            alone = model(row[None])[0]
            torch.testing.assert_close(logits[idx], alone, rtol=0, atol=1e-5)


def test_shared_prefix_gradients_equal_each_row_alone():
    model = _model()
    tokens, pos, rows, where = _layout(GROUPS, torch.Generator().manual_seed(2))
    weights = [
        torch.randn(len(r), 97, generator=torch.Generator().manual_seed(i))
        for i, r in enumerate(rows)
    ]
    logits = model(tokens, mask=SharedPrefixMask(GROUPS), input_pos=pos)[0]
    sum((logits[idx] * w).sum() for idx, w in zip(where, weights)).backward()
    shared = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    sum((model(r[None])[0] * w).sum() for r, w in zip(rows, weights)).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(shared[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("groups", [((3,),), ((-1, 2),), ((2, 0),), ((2, 1.5),)])
def test_shared_prefix_mask_rejects_bad_groups(groups):
    with pytest.raises(ValueError, match="SharedPrefixMask groups"):
        SharedPrefixMask(groups)


def test_shared_prefix_mask_misuse_raises():
    model = _model()
    mask = SharedPrefixMask(((4, 2, 3),))
    tokens = torch.randint(3, 97, (1, 9))
    with pytest.raises(ValueError, match="needs input_pos"):
        model(tokens, mask=mask)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 4, 5, 6]])
    with pytest.raises(ValueError, match="cover 9 tokens, expected b \\* s = 8"):
        model(tokens[:, :8], mask=mask, input_pos=pos[:, :8])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(tokens, mask=SharedPrefixMask(((30, 2, 3),)), input_pos=pos)
    windowed = _model()
    windowed.layers[0].attn.sliding_window = 4
    with pytest.raises(ValueError, match="without a sliding window"):
        windowed(tokens, mask=mask, input_pos=pos)
