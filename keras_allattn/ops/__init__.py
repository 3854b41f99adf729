"""The all-attention math: the portable path, the dispatch point and the
counter-based attention dropout (the fused kernels live beside them)."""

from keras_allattn.ops.attention import all_attention
from keras_allattn.ops.attention import attention_probabilities
from keras_allattn.ops.attention import fused_kernel_applies
from keras_allattn.ops.attention import is_deterministic
from keras_allattn.ops.attention import portable_all_attention
from keras_allattn.ops.attention import set_deterministic
from keras_allattn.ops.attention import span_mask
from keras_allattn.ops.random import attention_dropout_keys
from keras_allattn.ops.random import dropout_multiplier

__all__ = [
    "all_attention",
    "attention_dropout_keys",
    "attention_probabilities",
    "dropout_multiplier",
    "fused_kernel_applies",
    "is_deterministic",
    "portable_all_attention",
    "set_deterministic",
    "span_mask",
]
