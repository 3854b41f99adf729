"""keras_allattn: the all-attention network for Keras 3."""

from keras_allattn.layers.adaptive_embedding import AdaptiveEmbedding
from keras_allattn.layers.adaptive_softmax import AdaptiveSoftmax
from keras_allattn.layers.adaptive_span import AdaptiveSpan
from keras_allattn.layers.feed_forward import FeedForward
from keras_allattn.layers.persistent_memory_attention import (
    PersistentMemoryAttention,
)
from keras_allattn.layers.relative_position import RelativePosition
from keras_allattn.layers.segment_memory import SegmentMemory
from keras_allattn.models.all_attention_lm import AllAttentionLM
from keras_allattn.models.all_attention_lm import SpanTrimming
from keras_allattn.export import export_saved_model
from keras_allattn import distribution
from keras_allattn.distribution import DataParallelPlan
from keras_allattn.distribution import DataParallelTrainer
from keras_allattn.distribution import data_parallel_distribution
from keras_allattn.distribution import plan_data_parallel

__version__ = "0.1.0"
