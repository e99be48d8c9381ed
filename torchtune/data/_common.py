# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.modules.tokenizers import Tokenizer

# The one label value that is not scored (torch.nn.CrossEntropyLoss's default ignore_index).
# Datasets, packing, collate and the losses all use it; it is deliberately not a setting:
# a loss told another value would score the prompt tokens the datasets mark with this one.
CROSS_ENTROPY_IGNORE_IDX = -100


def padding_id(tokenizer: Tokenizer) -> int:
    """The token id to pad with: ``tokenizer.pad_id`` where set, else ``tokenizer.eos_id``.

    Many models define no padding token (Llama 3, Qwen: ``pad_id`` is None). Any id inside the
    vocabulary does, because a padded position is never scored or attended to by a real token:
    its labels are ``CROSS_ENTROPY_IGNORE_IDX``, right padding sits after every real token under
    causal attention, packing gives the padding tail a document of its own, and generation
    never attends to its left padding. EOS is always in the vocabulary, so it is the fallback.

    Args:
        tokenizer (Tokenizer): any torchtune tokenizer.

    Returns:
        int: a non-negative token id.

    Raises:
        ValueError: if neither ``pad_id`` nor ``eos_id`` is a non-negative int.
    """
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    # bool is an int; a True/False id is a bug upstream, not an id.
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(
            f"{type(tokenizer).__name__} has pad_id={tokenizer.pad_id!r} and "
            f"eos_id={tokenizer.eos_id!r}; padding needs one of them to be a token id >= 0"
        )
    return pad_id
