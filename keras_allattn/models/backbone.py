"""The all-attention network of `AllAttentionLM`: token embedding, the
layers and their segment memory, without the output head."""

import contextlib
import functools
import math

import keras
import numpy as np
from keras import ops

from keras_allattn.layers.adaptive_embedding import AdaptiveEmbedding
from keras_allattn.layers.feed_forward import FeedForward
from keras_allattn.layers.persistent_memory_attention import (
    PersistentMemoryAttention,
)
from keras_allattn.layers.relative_position import RelativePosition
from keras_allattn.layers.segment_memory import SegmentMemory
from keras_allattn.utils import sync_jax_state


def trimmed_length(target, granularity, max_span):
    """The attended memory length for `target` rows: rounded up, capped.

    With an int `granularity` the step is fixed: `target` is rounded up to
    a multiple of it (at most `max_span / granularity` distinct lengths).
    With "auto" the step is relative to the length: the largest power of
    two at most `target / 8`, and at least 64, so there are at most 8
    distinct lengths per doubling (about 40 up to 8192) and, from a target
    of 512 on, a length is at most 12.5% over its target (a fixed step of
    256 gives 1280 rows for a span of 1024 plus its margin of 64: 25% more
    attention work than needed; "auto" gives 1152).

    Args:
        target: number, the rows needed (largest span plus margin).
        granularity: a positive int, or "auto".
        max_span: int, the cap.

    Returns:
        int, `min(max_span, ceil(target / step) * step)`.
    """
    rows = math.ceil(target)
    if granularity == "auto":
        # 2 ** floor(log2(rows / 8)) in integers (rows is an int).
        step = max(64, 1 << max(0, rows.bit_length() - 4))
    else:
        step = granularity
    return min(max_span, -(-rows // step) * step)


class AllAttentionBackbone(keras.Model):
    """The network and its state: what `AllAttentionLM` puts a head on.

    Token embedding (a `keras.layers.Embedding`, or an `AdaptiveEmbedding`
    with adaptive cutoffs) with its dropout, one `RelativePosition` table,
    and `num_layers` all-attention layers (`PersistentMemoryAttention`
    with a residual connection and post LayerNorm, epsilon 1e-5; with
    `feedforward_dim`, the feed-forward sublayer too), each reading the
    `SegmentMemory` of its layer. It owns the segment memory (the state
    carried from batch to batch: reset, read, write, a separate memory for
    evaluation) and the attended spans (memory trimming, remat).

    The layers are attributes of the model itself, so variable paths are
    `attention_0/...`, `memory_0/memory`, ... at the top level (the keys of
    the data-parallel layouts and of saved files). A subclass builds them
    with `_build_network` before calling `keras.Model.__init__` with its
    functional graph, which calls `_network`: `AllAttentionLM` is that
    subclass; this class is not used alone.

    References:
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1907.01470),
          "Augmenting Self-attention with Persistent Memory".
    """

    def __setattr__(self, name, value):
        # The torch backend's Module refuses layer attributes before
        # `Model.__init__` has made it a Module; the functional graph tracks
        # those layers anyway. From then on torch must see every attribute,
        # or `parameters()` (what DistributedDataParallel reads) is empty.
        if keras.backend.backend() == "torch" and "_modules" not in vars(self):
            return object.__setattr__(self, name, value)
        return super().__setattr__(name, value)

    def _build_network(
        self, vocabulary_size, num_layers, hidden_dim, num_heads,
        persistent_memory_size, max_span, batch_size, adaptive_span,
        span_ramp, span_init, span_loss_coeff, dropout, embedding_dropout,
        feedforward_dim, integration, implementation, remat,
        adaptive_cutoffs, adaptive_div_val, dtype,
    ):
        """Creates the network's layers (the arguments are checked)."""
        if adaptive_cutoffs is None:
            self.token_embedding = keras.layers.Embedding(
                vocabulary_size,
                hidden_dim,
                embeddings_initializer=keras.initializers.RandomNormal(
                    stddev=1.0
                ),
                dtype=dtype,
                name="token_embedding",
            )
        else:
            self.token_embedding = AdaptiveEmbedding(
                vocabulary_size,
                hidden_dim,
                adaptive_cutoffs,
                adaptive_div_val,
                dtype=dtype,
                name="token_embedding",
            )
        # A seeded dropout draws from a SeedGenerator variable (saved and
        # restored with the training state) rather than a global generator.
        self.embedding_dropout_layer = keras.layers.Dropout(
            embedding_dropout,
            seed=int(np.random.randint(2**31)),
            dtype=dtype,
            name="embedding_dropout",
        )
        self.relative_position = RelativePosition(
            head_dim=hidden_dim // num_heads,
            max_span=max_span,
            dtype=dtype,
            name="relative_position",
        )
        self.segment_memories = []
        self.attention_layers = []
        self.attention_norms = []
        self.feedforward_layers = []
        self.feedforward_norms = []
        for i in range(num_layers):
            self.segment_memories.append(
                SegmentMemory(
                    batch_size, max_span, dtype=dtype, name=f"memory_{i}"
                )
            )
            attention = PersistentMemoryAttention(
                    num_heads=num_heads,
                    max_span=max_span,
                    persistent_memory_size=persistent_memory_size,
                    adaptive_span=adaptive_span,
                    span_ramp=span_ramp,
                    span_init=span_init,
                    span_loss_coeff=span_loss_coeff,
                    integration=integration,
                    dropout=dropout,
                    implementation=implementation,
                    remat=False if remat == "auto" else remat,
                    dtype=dtype,
                    name=f"attention_{i}",
                )
            self.attention_layers.append(attention)
            # The memory hands its attention the rows it attends, read at
            # every call (the functional graph would freeze an argument).
            self.segment_memories[-1].attended_rows = functools.partial(
                getattr, attention, "attended_span"
            )
            self.attention_norms.append(
                keras.layers.LayerNormalization(
                    epsilon=1e-5, dtype=dtype, name=f"attention_norm_{i}"
                )
            )
            if feedforward_dim is not None:
                self.feedforward_layers.append(
                    FeedForward(
                        feedforward_dim,
                        dropout=dropout,
                        dtype=dtype,
                        name=f"feedforward_{i}",
                    )
                )
                self.feedforward_norms.append(
                    keras.layers.LayerNormalization(
                        epsilon=1e-5, dtype=dtype, name=f"feedforward_norm_{i}"
                    )
                )

    def _network(self, tokens, memories=None, training=None):
        """The network; stateful when `memories` is None, else stateless.

        Returns:
            `(hidden, next_memories)`: the final hidden states `(B, M, d)`
            and, with explicit `memories`, the memories after these tokens
            (empty when the memory variables were used and updated).
        """
        hidden = self.token_embedding(tokens)  # (B, M, d)
        hidden = self.embedding_dropout_layer(hidden, training=training)
        positions = self.relative_position(hidden)  # (D, L)
        next_memories = []
        for i, attention in enumerate(self.attention_layers):
            memory_layer = self.segment_memories[i]
            if memories is None:
                # (B, A, d): the attended rows; the state is updated.
                memory = memory_layer(hidden)
            else:
                memory = memories[i]
                next_memories.append(memory_layer.next_memory(memory, hidden))
            attended = attention(
                hidden, memory=memory, position_keys=positions, training=training
            )
            hidden = self.attention_norms[i](hidden + attended)
            if self.feedforward_layers:
                fed = self.feedforward_layers[i](hidden, training=training)
                hidden = self.feedforward_norms[i](hidden + fed)
        return hidden, next_memories

    def initial_memories(self, batch_size):
        """Zero memories for `batch_size` new streams (a list per layer)."""
        shape = (batch_size, self.max_span, self.hidden_dim)
        dtype = self.segment_memories[0].compute_dtype
        return [ops.zeros(shape, dtype) for _ in range(self.num_layers)]

    def reset_memory(self):
        """Zeroes the segment memory of every layer and stream."""
        for memory_layer in self.segment_memories:
            memory_layer.reset()

    def current_spans(self):
        """Current span in tokens of every head, `(num_layers, num_heads)`.

        Without adaptive span every head attends `max_span` tokens.
        """
        if not self.adaptive_span:
            return np.full((self.num_layers, self.num_heads), self.max_span)
        return np.stack([a.span.current_spans() for a in self.attention_layers])

    def update_span_trimming(self, margin=64, spans=None, headroom=0):
        """Sets each layer's attended memory length from its learned spans.

        The length is the layer's largest current span plus `margin`,
        rounded up by `span_granularity` and capped at `max_span` (see
        `trimmed_length`). It grows as soon as a span comes within
        `headroom` of it and shrinks only when the target falls below it,
        so spans that hover near a boundary do not cause repeated
        retraces. Compiled functions are rebuilt when a length changes.

        Args:
            margin: int, tokens added to the largest span.
            spans: None to read `current_spans()`, or spans read before,
                `(num_layers, num_heads)`.
            headroom: int, grow when a span is closer than this to the
                attended length (for spans read some steps late).

        Returns:
            bool, whether any length changed.
        """
        if not self.adaptive_span:
            return False
        if spans is None:
            spans = self.current_spans()
        changed = False
        for attention, largest in zip(
            self.attention_layers, np.asarray(spans).max(axis=1)
        ):
            target = trimmed_length(
                largest + margin, self.span_granularity, self.max_span
            )
            attended = attention.attended_span
            if attended < largest + headroom or target < attended:
                if target != attended:
                    attention.set_attended_span(target)
                    changed = True
        if changed:
            self.test_function = None
            self.predict_function = None
            if self.train_function is not None:
                self.make_train_function(force=True)
        return changed

    def attended_spans(self):
        """The memory rows each layer currently attends, a list of ints."""
        return [a.attended_span for a in self.attention_layers]

    def resolve_remat(self):
        """Applies the remat setting before training; returns the mode.

        With `remat="auto"`, the least recomputation whose estimated
        training memory fits (see `keras_allattn.models.memory_estimate`);
        with a fixed setting, checks that it fits. Either way a model that
        cannot fit raises a ValueError here, before anything is compiled.
        The choice is made once; `fit` calls this first.
        """
        from keras_allattn.models import memory_estimate

        if self._remat_checked:
            return self.resolved_remat
        if self.remat == "auto":
            mode = memory_estimate.choose_remat(self)[0]
        else:
            mode = self.remat
            memory_estimate.check_fits(self, mode)
        if any(layer.remat != mode for layer in self.attention_layers):
            for layer in self.attention_layers:
                layer.remat = mode
            self.train_function = None
        self.resolved_remat = mode
        self._remat_checked = True
        return mode

    def get_memory(self):
        """The training segment memory, a NumPy array per layer.

        Returns:
            A list of `num_layers` arrays `(batch_size, max_span,
            hidden_dim)`: what the next batch of `fit` (or a direct call
            `model(tokens)`) will attend to.
        """
        sync_jax_state(self)
        return [
            layer.ordered(ops.convert_to_numpy(layer.memory))
            for layer in self.segment_memories
        ]

    def set_memory(self, memories):
        """Sets the training segment memory (e.g. from `get_memory()`).

        Args:
            memories: a list of `num_layers` arrays `(batch_size, max_span,
                hidden_dim)`.
        """
        if len(memories) != self.num_layers:
            raise ValueError(
                f"`memories` must hold num_layers={self.num_layers} arrays. "
                f"Received: {len(memories)} arrays"
            )
        sync_jax_state(self)
        for i, (layer, memory) in enumerate(zip(self.segment_memories, memories)):
            shape = (layer.batch_size, layer.memory_length, layer.memory.shape[-1])
            if tuple(memory.shape) != shape:
                raise ValueError(
                    f"`memories[{i}]` must have shape {shape}. Received: "
                    f"shape={tuple(memory.shape)}"
                )
            layer.set_value(memory)

    @contextlib.contextmanager
    def _separate_memory(self):
        """Zero memory inside the block; the training memory after it."""
        sync_jax_state(self)
        kept = [layer.snapshot() for layer in self.segment_memories]
        self.reset_memory()
        try:
            yield
        finally:
            for layer, memory in zip(self.segment_memories, kept):
                layer.restore(memory)
