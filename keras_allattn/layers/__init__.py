"""The all-attention network's layers, one public layer per file."""

from keras_allattn.layers.adaptive_embedding import AdaptiveEmbedding
from keras_allattn.layers.adaptive_softmax import AdaptiveSoftmax
from keras_allattn.layers.adaptive_span import AdaptiveSpan
from keras_allattn.layers.feed_forward import FeedForward
from keras_allattn.layers.persistent_memory_attention import (
    PersistentMemoryAttention,
)
from keras_allattn.layers.relative_position import RelativePosition
from keras_allattn.layers.segment_memory import SegmentMemory

__all__ = [
    "AdaptiveEmbedding",
    "AdaptiveSoftmax",
    "AdaptiveSpan",
    "FeedForward",
    "PersistentMemoryAttention",
    "RelativePosition",
    "SegmentMemory",
]
