# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.modules.attention import CausalSelfAttention, DocumentMask, SharedPrefixMask
from torchtune.modules.feed_forward import FeedForward
from torchtune.modules.kv_cache import KVCache
from torchtune.modules.position_embeddings import RotaryPositionalEmbeddings
from torchtune.modules.rms_norm import RMSNorm
from torchtune.modules.transformer import TransformerDecoder, TransformerDecoderLayer
from torchtune.modules.weight_init import init_weights_

__all__ = [
    "CausalSelfAttention",
    "DocumentMask",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "RotaryPositionalEmbeddings",
    "SharedPrefixMask",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "init_weights_",
]
