# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Batched autoregressive generation with left padding and the KV cache."""

from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit outside the ``top_k`` largest of its row to ``-inf``.

    Args:
        logits: ``[b, vocab]``.
        top_k: number of candidates kept per row (ties with the k-th value are kept too).

    Returns:
        ``[b, vocab]``, a filtered copy.
    """
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens whose cumulative probability reaches ``top_p``.

    A token is dropped when the probability mass of the strictly less likely tokens plus its own
    is at most ``1 - top_p`` (so the most likely token always survives).

    Args:
        logits: ``[b, vocab]``.
        top_p: probability mass in ``(0, 1]``.

    Returns:
        ``[b, vocab]``, a filtered copy.
    """
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [b, vocab]
    drop_sorted = cum <= 1 - top_p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick one token per row from next-token logits.

    ``temperature == 0`` is greedy (argmax; ``top_k``/``top_p`` are then irrelevant). Otherwise
    the logits are divided by ``temperature``, filtered by ``top_k`` then ``top_p`` (the order
    transformers uses) and sampled.

    Args:
        logits: ``[b, vocab]``.
        temperature: ``>= 0``.
        top_k: keep only the ``top_k`` most likely tokens, or None.
        top_p: nucleus mass in ``(0, 1]``, or None.
        generator: RNG for sampling (on the logits' device), or None for the global one.

    Returns:
        ``LongTensor[b]``.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_args(
    max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float]
) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _as_rows(prompts: Union[torch.Tensor, Sequence[Sequence[int]]]) -> List[List[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts.unsqueeze(0)
        if prompts.dim() != 2:
            raise ValueError(
                f"prompts tensor must be [s] or [b, s], got shape {tuple(prompts.shape)}"
            )
        return prompts.tolist()
    rows = [[int(t) for t in row] for row in prompts]
    if not rows:
        raise ValueError("prompts is empty; pass at least one prompt")
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token")
    return rows


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Union[torch.Tensor, Sequence[Sequence[int]]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Optional[Iterable[int]] = None,
    pad_id: int = 0,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    stop_fn: Optional[Callable[[List[int]], bool]] = None,
) -> List[List[int]]:
    """Continue a batch of prompts of different lengths, token by token.

    Prompts are left-padded to a common width ``w`` so every row's last prompt token sits in the
    last column. Each row's positions count from its first real token (as if it were alone),
    and pad positions are never attended.

    With ``use_cache`` (default) the prompts are prefilled in one forward and then one token per
    row is decoded per step with the model's KV cache. A cache slot is a token's position; the
    ``p`` pad tokens of a row are parked in the last ``p`` slots of the cache, which no real token
    of that row reaches (its positions stop at ``w - p + max_new_tokens - 1``). Caches already set
    up with enough batch rows and slots are reset and reused; otherwise the call sets up caches of
    exactly ``w + max_new_tokens`` slots and restores the model's previous caches (or none) after.
    Sliding-window layers band over cache slots, i.e. over a row's own positions: the same real
    tokens transformers' window over the padded columns covers, so a padded row decodes exactly
    as its prompt alone.

    Rotary modules whose tables depend on the sequence length (LongRoPE: short factors up to
    its ``switch_length``, long ones past it) are told the batch's length (the padded width
    plus the tokens so far, what transformers' position ids give; the parked pad slots are no
    positions), and when decoding first crosses ``switch_length`` the cache is refilled: the
    whole sequence re-encoded with the long factors, as transformers' ``generate`` does there.

    With ``use_cache=False`` the whole sequence is recomputed every step (slow; the reference the
    cached path is tested against). The model must have no caches then.

    Args:
        model: a :class:`~torchtune.modules.TransformerDecoder` (any module with the same
            ``forward(tokens, mask=, input_pos=)``, ``max_seq_len`` and cache methods works).
        prompts: a list of token-id lists (lengths may differ), or ``LongTensor[b, s]`` / ``[s]``.
        max_new_tokens: the most tokens to generate per row.
        temperature: 0 is greedy decoding; > 0 samples from ``softmax(logits / temperature)``.
        top_k: sample only among the ``top_k`` most likely tokens.
        top_p: sample only within the nucleus of mass ``top_p``.
        stop_tokens: ids (e.g. EOS) that end a row; the stop token is not returned.
        pad_id: id used for left padding and for rows that have stopped (never attended).
        generator: RNG for sampling, on the model's device, for reproducible sampling.
        use_cache: decode with the KV cache (True) or recompute the full sequence (False).
        stop_fn: optional ``stop_fn(row_new_tokens) -> bool`` checked after every step, e.g. to
            stop at a stop *string*; the tokens that triggered it are kept.

    Returns:
        The new tokens of each row (without the prompt and without a final stop token), in
        prompt order.

    Raises:
        ValueError: on bad arguments, an empty prompt, or ``w + max_new_tokens`` above the
            model's ``max_seq_len``.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    rows = _as_rows(prompts)
    stop_set = set(int(t) for t in (stop_tokens or ()))
    b = len(rows)
    lens = [len(r) for r in rows]
    width = max(lens)
    max_seq_len = model.max_seq_len
    if width + max_new_tokens > max_seq_len:
        raise ValueError(
            f"longest prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_seq_len ({max_seq_len}); shorten the prompt or generate fewer tokens"
        )
    if max_new_tokens == 0:
        return [[] for _ in rows]

    param = next(model.parameters())
    device = param.device
    tokens = torch.tensor(
        [[pad_id] * (width - n) + r for r, n in zip(rows, lens)], dtype=torch.long, device=device
    )  # [b, w]
    pads = torch.tensor([width - n for n in lens], device=device)  # [b]
    col = torch.arange(width, device=device)
    is_pad = col.unsqueeze(0) < pads.unsqueeze(1)  # [b, w]

    need = width + max_new_tokens
    saved_caches = None
    if use_cache:
        cache = model.layers[0].attn.kv_cache if model.caches_are_enabled() else None
        if cache is not None and cache.batch_size >= b and cache.max_seq_len >= need:
            model.reset_caches()
        else:
            # Only the slots this call needs: less memory and less attention work per token.
            saved_caches = [layer.attn.kv_cache for layer in model.layers]
            model.setup_caches(batch_size=b, dtype=param.dtype, max_seq_len=need)
        cache_len = model.layers[0].attn.kv_cache.max_seq_len
    elif model.caches_are_enabled():
        raise ValueError(
            "use_cache=False needs a model without KV caches; call model.teardown_caches()"
        )

    try:
        if use_cache:
            step = _CachedStepper(model, tokens, pads, is_pad, cache_len)
        else:
            step = _RecomputeStepper(model, tokens, pads, is_pad)
        logits = step.prefill()  # [b, vocab]

        new_tokens: List[List[int]] = [[] for _ in range(b)]
        done = [False] * b
        for t in range(max_new_tokens):
            next_tok = sample_next_token(logits, temperature, top_k, top_p, generator)  # [b]
            done_mask = torch.tensor(done, device=device)
            next_tok = next_tok.masked_fill(done_mask, pad_id)
            for i, tok in enumerate(next_tok.tolist()):  # a CPU-GPU sync point per step
                if done[i]:
                    continue
                if tok in stop_set:
                    done[i] = True
                    continue
                new_tokens[i].append(tok)
                if stop_fn is not None and stop_fn(new_tokens[i]):
                    done[i] = True
            if all(done) or t == max_new_tokens - 1:
                break
            logits = step.decode(next_tok, t)
        return new_tokens
    finally:
        if saved_caches is not None:  # give the caller back exactly the caches it had
            for layer, kv_cache in zip(model.layers, saved_caches):
                layer.attn.kv_cache = kv_cache


def _length_dependent_ropes(model: nn.Module) -> List[nn.Module]:
    """Rotary modules that pick their tables by the sequence length (``switch_length`` set)."""
    return [m for m in model.modules() if getattr(m, "switch_length", None) is not None]


class _CachedStepper:
    """Prefill then one-token decode steps over the KV cache (see :func:`generate`)."""

    def __init__(self, model, tokens, pads, is_pad, cache_len):
        self.model, self.tokens, self.pads = model, tokens, pads
        self.ropes = _length_dependent_ropes(model)
        self.switches = {m.switch_length for m in self.ropes}
        self.generated: List[torch.Tensor] = []  # [b] per decode step, for a re-encode
        self.lens = tokens.size(1) - pads  # [b]
        self.slots = torch.arange(cache_len, device=tokens.device)
        # Slots a real query may see: everything below the row's parking area (causality does the rest).
        self.visible = self.slots.unsqueeze(0) < (cache_len - pads).unsqueeze(1)  # [b, cache_len]
        col = torch.arange(tokens.size(1), device=tokens.device)
        real_pos = col.unsqueeze(0) - pads.unsqueeze(1)  # [b, w]
        parked = (
            cache_len - pads.unsqueeze(1) + col.unsqueeze(0)
        )  # pad j of a row -> slot L - p + j
        self.prompt_pos = torch.where(is_pad, parked, real_pos)

    def _mask(self, pos: torch.Tensor) -> torch.Tensor:
        # [b, s, cache_len]: causal over slots, never the parked pad slots, except that a
        # query always sees its own slot. Real queries see theirs anyway; a pad parked more
        # than a sliding window right of its row's real slots would otherwise have an empty
        # softmax row, NaN on kernels that do not zero those, and its NaN keys and values
        # would reach real rows as 0 * NaN.
        slots = self.slots.view(1, 1, -1)
        pos = pos.unsqueeze(-1)
        return (slots <= pos) & (self.visible.unsqueeze(1) | (slots == pos))

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, seq_len: int) -> torch.Tensor:
        for rope in self.ropes:
            rope.seq_len_override = seq_len
        try:
            return self.model(tokens, input_pos=pos, mask=self._mask(pos))[:, -1]
        finally:
            for rope in self.ropes:
                rope.seq_len_override = None

    def prefill(self) -> torch.Tensor:
        return self._forward(self.tokens, self.prompt_pos, self.tokens.size(1))

    def decode(self, next_tok: torch.Tensor, t: int) -> torch.Tensor:
        if self.switches:
            self.generated.append(next_tok)
        past = self.tokens.size(1) + t  # what the cache holds, in padded columns
        if past in self.switches:
            # The cached keys took the short factors: re-encode everything (transformers too).
            self.model.reset_caches()
            new = torch.stack(self.generated, dim=1)  # [b, t + 1]
            steps = torch.arange(t + 1, device=new.device)
            pos = torch.cat([self.prompt_pos, self.lens.unsqueeze(1) + steps], dim=1)
            return self._forward(torch.cat([self.tokens, new], dim=1), pos, past + 1)
        pos = (self.lens + t).unsqueeze(1)  # [b, 1]
        return self._forward(next_tok.unsqueeze(1), pos, past + 1)


class _RecomputeStepper:
    """Reference path: a full cache-free forward over prompt + new tokens at every step."""

    def __init__(self, model, tokens, pads, is_pad):
        self.model, self.tokens, self.pads = model, tokens, pads

    def _forward(self) -> torch.Tensor:
        s = self.tokens.size(1)
        col = torch.arange(s, device=self.tokens.device)
        pos = (col.unsqueeze(0) - self.pads.unsqueeze(1)).clamp(min=0)  # [b, s]
        q, k = col.view(1, -1, 1), col.view(1, 1, -1)
        real_key = k >= self.pads.view(-1, 1, 1)
        # A pad query sees only itself so no softmax row is empty; its output is never used.
        mask = (k <= q) & (real_key | (k == q))  # [b, s, s]
        return self.model(self.tokens, input_pos=pos, mask=mask)[:, -1]

    def prefill(self) -> torch.Tensor:
        return self._forward()

    def decode(self, next_tok: torch.Tensor, t: int) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, next_tok.unsqueeze(1)], dim=1)
        return self._forward()
