"""What the layers of a trained all-attention network attend to.

`attention_statistics(model, tokens)` runs a model over text and reports,
per layer and head, how much attention goes to the persistent vectors and
how much to the context, the learned span, and the mean attention weight
at every distance: the questions the paper raises about what persistent
vectors and spans learn (Sukhbaatar et al., 2019, §5).
"""

import numpy as np
from keras import ops

from keras_allattn.compiling import inference_function
from keras_allattn.data.stream import check_token_range
from keras_allattn.utils import check_non_negative

__all__ = ["attention_statistics"]


def attention_statistics(model, tokens, warmup_tokens=None):
    """Attention mass per layer and head: persistent vs context, by distance.

    Runs `model` over `tokens` segment after segment, carrying every
    layer's segment memory from one segment to the next exactly as
    evaluation does (`model.call_with_memory`, zero memory at the start of
    each row, no dropout), and takes the attention weights of every layer
    on every segment: the layer's own projections, persistent vectors,
    adaptive-span mask and renormalisation, from
    `PersistentMemoryAttention.attention_probabilities` (the portable
    path's math; a fused kernel computes the same weights). The inputs of
    each layer are those of the model itself: the rows that
    `call_with_memory` puts into the next memory. Each segment is one
    compiled call, as in `keras_allattn.data.evaluate_stream`, and only
    the sums over its queries come back to the host.

    The weights are averaged over the queries of every row that come after
    its first `warmup_tokens` tokens. With the default, `max_span`, every
    query counted attends to `max_span` real tokens, never to the zero
    memory of a stream's start; the first `warmup_tokens` tokens of each
    row only fill the memory.

    With `integration="joint"` the persistent and context shares of a head
    sum to 1 (up to the 1e-8 of the span renormalisation). With
    `integration="separate"` the two softmaxes each sum to 1 and their
    outputs are added, so both shares are 1: the split between the two is
    not a property of the weights.

    Args:
        model: an `AllAttentionLM`.
        tokens: int token ids, `(T,)` for one stream or `(B, T)` for `B`
            streams read side by side, each longer than `warmup_tokens`.
        warmup_tokens: int >= 0, tokens at the start of every row whose
            queries are not counted; `None` for `model.max_span`.

    Returns:
        A dict of NumPy arrays and numbers:
        - "persistent_share": float64 `(num_layers, num_heads)`, the mean
          total weight on the persistent vectors (0 without them).
        - "context_share": float64 `(num_layers, num_heads)`, the mean
          total weight on the previous `max_span` positions.
        - "mass_by_distance": float64 `(num_layers, num_heads, max_span)`,
          the mean weight at each distance; index `k` is the token `k + 1`
          positions back (index 0, the previous token). It sums to
          "context_share" over the last axis.
        - "spans": int `(num_layers, num_heads)`, `model.current_spans()`:
          the learned span in tokens, `max_span` without adaptive span.
        - "queries": int, the queries averaged, `B * (T - warmup_tokens)`.
        - "warmup_tokens", "max_span", "integration": as used.

    Example:

    >>> model = AllAttentionLM(vocabulary_size=27, num_layers=2,
    ...     hidden_dim=32, num_heads=4, persistent_memory_size=8,
    ...     max_span=16, block_size=8, batch_size=2)
    >>> tokens = np.random.randint(0, 27, (2, 48))
    >>> stats = attention_statistics(model, tokens)
    >>> stats["persistent_share"].shape, stats["mass_by_distance"].shape
    ((2, 4), (2, 4, 16))

    References:
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1907.01470),
          "Augmenting Self-attention with Persistent Memory".
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1905.07799),
          "Adaptive Attention Span in Transformers".
    """
    max_span = model.max_span
    if warmup_tokens is None:
        warmup_tokens = max_span
    warmup_tokens = check_non_negative("warmup_tokens", warmup_tokens)
    tokens = _token_rows(tokens, warmup_tokens, model.vocabulary_size)
    rows, length = tokens.shape
    # A segment's layer inputs are the last rows of the next memory, so a
    # segment holds at most `max_span` tokens; the weights do not depend
    # on how the stream is cut.
    segment = min(model.block_size, max_span)
    layers, heads = model.num_layers, model.num_heads
    persistent = np.zeros((layers, heads))
    by_distance = np.zeros((layers, heads, max_span))
    statistics = _segment_statistics(model)
    memories = model.initial_memories(rows)
    for start in range(0, length, segment):
        block = tokens[:, start : start + segment]
        # 1 for the queries counted, 0 for those of the warm-up.
        counted = (np.arange(start, start + block.shape[1]) >= warmup_tokens)
        context, kept, memories = statistics(
            ops.convert_to_tensor(block, "int32"),
            list(memories),
            ops.convert_to_tensor(counted.astype("float32")),
        )
        # Column c holds distance max_span - c; reversed, index k holds
        # distance k + 1.
        context = np.asarray(ops.convert_to_numpy(context), "float64")
        by_distance += context[..., ::-1]
        persistent += np.asarray(ops.convert_to_numpy(kept), "float64")
    queries = rows * (length - warmup_tokens)
    by_distance /= queries
    return {
        "persistent_share": persistent / queries,
        "context_share": by_distance.sum(axis=-1),
        "mass_by_distance": by_distance,
        "spans": np.asarray(model.current_spans(), "int64"),
        "queries": int(queries),
        "warmup_tokens": int(warmup_tokens),
        "max_span": int(max_span),
        "integration": model.integration,
    }


def _segment_statistics(model):
    """`statistics(tokens, memories, counted)` for one segment.

    Returns the sums, over rows and the queries weighted by `counted`
    (`(m,)`), of every layer's context weights `(num_layers, H, max_span)`
    (columns as in `attention_probabilities`: the oldest first) and of its
    persistent weights `(num_layers, H)`, and the memories after the
    segment. Compiled as `evaluate_stream` compiles its blocks (XLA on
    TensorFlow and JAX, eager under `torch.no_grad()` on PyTorch).
    """
    max_span, heads = model.max_span, model.num_heads

    def statistics(tokens, memories, counted):
        _, next_memories = model.call_with_memory(tokens, memories)
        size = tokens.shape[1]
        positions = model.relative_position(next_memories[0])  # (D, L)
        weight = ops.reshape(counted, (1, 1, size, 1))
        context_sums, persistent_sums = [], []
        for i, attention in enumerate(model.attention_layers):
            # The layer's inputs: the segment's rows of its next memory.
            inputs = next_memories[i][:, max_span - size :]  # (B, m, d)
            context, kept = attention.attention_probabilities(
                inputs, memories[i], positions
            )
            context_sums.append(ops.sum(context * weight, axis=(0, 2)))
            persistent_sums.append(
                ops.zeros((heads,), "float32") if kept is None
                else ops.sum(kept * weight, axis=(0, 2, 3))
            )
        return (ops.stack(context_sums), ops.stack(persistent_sums),
                list(next_memories))

    return inference_function(model, "_statistics_functions", statistics)


def _token_rows(tokens, warmup_tokens, vocabulary_size):
    """`tokens` as an int32 `(B, T)` array, checked: ids in
    `[0, vocabulary_size)`, `T > warmup_tokens`."""
    array = np.asarray(ops.convert_to_numpy(tokens))
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "`tokens` must be integer token ids of shape (T,) or (B, T). "
            f"Received: tokens with shape {array.shape} and dtype "
            f"{array.dtype}"
        )
    if array.shape[1] <= warmup_tokens:
        raise ValueError(
            "Every row of `tokens` must be longer than `warmup_tokens`="
            f"{warmup_tokens} (the tokens that only fill the memory). "
            f"Received: rows of {array.shape[1]} tokens"
        )
    # Positions in the message count the rows one after the other.
    check_token_range(array.ravel(), vocabulary_size, "tokens",
                      f"vocabulary_size={vocabulary_size}")
    return array.astype("int32")
