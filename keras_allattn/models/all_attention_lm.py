import math

import keras
import numpy as np
from keras import ops

from keras_allattn.layers.adaptive_embedding import AdaptiveEmbedding
from keras_allattn.layers.adaptive_embedding import check_cutoffs
from keras_allattn.layers.adaptive_embedding import cluster_widths
from keras_allattn.layers.adaptive_softmax import AdaptiveSoftmax
from keras_allattn.layers.feed_forward import FeedForward
from keras_allattn.layers.persistent_memory_attention import (
    PersistentMemoryAttention,
)
from keras_allattn.layers.relative_position import RelativePosition
from keras_allattn.layers.segment_memory import SegmentMemory
from keras_allattn import presets as preset_table
from keras_allattn.ops.attention import IMPLEMENTATIONS
from keras_allattn.ops.attention import INTEGRATIONS
from keras_allattn.utils import check_choice
from keras_allattn.utils import check_non_negative
from keras_allattn.utils import check_positive
from keras_allattn.utils import check_rate
from keras_allattn.utils import check_unit_interval
from keras_allattn.utils import torch_default_uniform


@keras.saving.register_keras_serializable(package="keras_allattn")
class AllAttentionLM(keras.Model):
    """The all-attention language model (a functional `keras.Model`).

    Token embedding (no absolute positions), `num_layers` all-attention
    layers (`PersistentMemoryAttention` with a residual connection and post
    LayerNorm, epsilon 1e-5) sharing one `RelativePosition` table, and an
    output projection to logits. With `feedforward_dim` set, each layer also
    gets the feed-forward sublayer: the baseline Transformer of the paper's
    comparison (set `persistent_memory_size=0` for the plain baseline).

    The segment memory of every layer (the layer's inputs for the previous
    `max_span` tokens of each of the `batch_size` streams) lives in
    non-trainable variables and is carried from batch to batch inside
    `fit`, `evaluate` and `predict`, compiled or not: consecutive batches
    must continue the same streams row by row, and every batch must hold
    exactly `batch_size` rows. `reset_memory()` zeroes it. The stateless
    `call_with_memory(tokens, memories)` takes and returns the memories
    explicitly, for generation and serving.

    Compile with `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`
    on targets shifted by one token. The span loss of adaptive span is added
    through `add_loss`.

    Word level (adaptive input and adaptive softmax): with `adaptive_cutoffs`
    the token embedding is an `AdaptiveEmbedding` and the output layer an
    `AdaptiveSoftmax` (`model.adaptive_softmax`), tied to the embedding by
    default, and training never builds `(batch, block, V)` logits. The
    model's output (`model(x)`, `predict`, and so the `y_pred` of `fit`)
    is then the final hidden states `(batch_size, block_size, hidden_dim)`,
    and `compute_loss` turns hidden states and targets into the loss: the
    mean negative log-likelihood of the targets in nats, exact, from the
    adaptive softmax's target path (chunked and recomputed in the backward
    pass), plus the span loss. Compile with `loss=None` (the default) and
    no compiled metrics (they would only see hidden states); `fit` and
    `evaluate` report this loss, and perplexity is `exp(loss)` (the span
    loss aside: `keras_allattn.data.evaluate_stream` gives the exact
    figure). As `compute_loss` runs inside the train and test steps of
    every backend, this works compiled (`jit_compile=True`) on TensorFlow,
    JAX and PyTorch. `call_with_memory` returns float32 log-probabilities
    over the vocabulary instead of logits (the same distribution under a
    softmax: generation, `evaluate_stream` and export work unchanged), and
    `model.adaptive_softmax(hidden)` gives them for any hidden states.

    Memory trimming: with adaptive span, attention only looks at the most
    recent `attended_span` memory rows of each layer, the largest current
    span of its heads plus a margin of 64, rounded up to a multiple of
    `span_granularity` (so at most `max_span / span_granularity` distinct
    lengths, hence retraces of compiled functions). `fit` updates it after
    every batch (`SpanTrimming` callback, added automatically), and
    `evaluate` and `predict` before they start. It changes no result: the
    rows left out all have a span mask of zero.

    Args:
        vocabulary_size: int, number of token ids `V`.
        num_layers: int, number of all-attention layers.
        hidden_dim: int, model width `d`, divisible by `num_heads`.
        num_heads: int, attention heads `H`.
        persistent_memory_size: int >= 0, persistent vectors `N` per head
            and layer.
        max_span: int, the attention span `L` (memory rows per layer).
        block_size: int, tokens per segment `M` (the input length).
        batch_size: int, streams per batch (static).
        adaptive_span: bool, learn a span per head.
        span_ramp: int, adaptive-span ramp `R`.
        span_init: float in [0, 1], initial span ratio.
        span_loss_coeff: float >= 0, span loss weight.
        dropout: float in [0, 1), dropout on attention weights (and after
            the ReLU of the feed-forward sublayer).
        embedding_dropout: float in [0, 1), dropout on token embeddings.
        feedforward_dim: None for the all-attention network, or an int for
            the baseline Transformer layer with a feed-forward sublayer.
        integration: "joint" (default) or "separate"; see
            `PersistentMemoryAttention`.
        implementation: "auto" or "portable"; see
            `keras_allattn.ops.all_attention`.
        span_granularity: int, the memory trimming step in tokens.
        remat: bool, recompute the attention weights in the backward pass
            instead of keeping them (gradient checkpointing); see
            `PersistentMemoryAttention`.
        adaptive_cutoffs: None for a full softmax, or a list of ints
            strictly increasing in `[1, vocabulary_size)` (token ids ordered
            by decreasing frequency) for adaptive input embeddings and an
            adaptive softmax with these clusters, e.g. `[20000, 40000,
            200000]` for WikiText-103.
        adaptive_div_val: int >= 1, the width divisor from one adaptive
            cluster to the next (4 in the reference).
        adaptive_tie_weights: bool, share the adaptive clusters' embedding
            matrices and projections between input and output.
        dtype: the dtype policy of the layers (e.g. "mixed_bfloat16");
            logits are always float32.
        **kwargs: `keras.Model` arguments such as `name`.

    Call arguments:
        inputs: int32 token ids of shape `(batch_size, block_size)`.
        training: bool, whether dropout is active.

    Returns:
        float32 logits of shape `(batch_size, block_size, vocabulary_size)`;
        with `adaptive_cutoffs`, the final hidden states
        `(batch_size, block_size, hidden_dim)` (see above).

    Example:

    >>> model = AllAttentionLM(vocabulary_size=27, num_layers=2,
    ...     hidden_dim=32, num_heads=4, persistent_memory_size=8,
    ...     max_span=16, block_size=8, batch_size=2)
    >>> model.compile(
    ...     optimizer="adagrad",
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> x = np.random.randint(0, 27, (4, 9)).astype("int32")
    >>> history = model.fit(x[:, :-1], x[:, 1:], batch_size=2, verbose=0)
    >>> tuple(model.predict(x[:2, :-1], batch_size=2, verbose=0).shape)
    (2, 8, 27)

    References:
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1907.01470),
          "Augmenting Self-attention with Persistent Memory".
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1905.07799),
          "Adaptive Attention Span in Transformers".
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        num_heads,
        persistent_memory_size,
        max_span,
        block_size,
        batch_size,
        adaptive_span=True,
        span_ramp=32,
        span_init=0.0,
        span_loss_coeff=0.0,
        dropout=0.0,
        embedding_dropout=0.0,
        feedforward_dim=None,
        integration="joint",
        implementation="auto",
        span_granularity=256,
        remat=False,
        adaptive_cutoffs=None,
        adaptive_div_val=4,
        adaptive_tie_weights=True,
        dtype=None,
        **kwargs,
    ):
        check_positive("vocabulary_size", vocabulary_size)
        check_positive("num_layers", num_layers)
        check_positive("hidden_dim", hidden_dim)
        check_positive("num_heads", num_heads)
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. Received: "
                f"hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        check_non_negative("persistent_memory_size", persistent_memory_size)
        check_positive("max_span", max_span)
        check_positive("block_size", block_size)
        check_positive("batch_size", batch_size)
        check_positive("span_ramp", span_ramp)
        check_unit_interval("span_init", span_init)
        if not span_loss_coeff >= 0:
            raise ValueError(
                "`span_loss_coeff` must be a non-negative number. "
                f"Received: span_loss_coeff={span_loss_coeff!r}"
            )
        check_rate("dropout", dropout)
        check_rate("embedding_dropout", embedding_dropout)
        if feedforward_dim is not None:
            check_positive("feedforward_dim", feedforward_dim)
        check_choice("integration", integration, INTEGRATIONS)
        check_choice("implementation", implementation, IMPLEMENTATIONS)
        check_positive("span_granularity", span_granularity)
        if adaptive_cutoffs is not None:
            adaptive_cutoffs = check_cutoffs(
                adaptive_cutoffs, vocabulary_size, "adaptive_cutoffs"
            )
            check_positive("adaptive_div_val", adaptive_div_val)
            cluster_widths(
                hidden_dim, adaptive_cutoffs, adaptive_div_val, "adaptive_div_val"
            )

        # === Layers ===
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
                    remat=remat,
                    dtype=dtype,
                    name=f"attention_{i}",
                )
            self.attention_layers.append(attention)
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
        self.adaptive_softmax = None
        if adaptive_cutoffs is None:
            self.output_dense = keras.layers.Dense(
                vocabulary_size,
                kernel_initializer=torch_default_uniform(hidden_dim),
                bias_initializer=torch_default_uniform(hidden_dim),
                dtype=dtype,
                name="output",
            )
            self.logits_cast = keras.layers.Activation(
                "linear", dtype="float32", name="logits"
            )
        else:
            self.adaptive_softmax = AdaptiveSoftmax(
                vocabulary_size,
                hidden_dim,
                adaptive_cutoffs,
                adaptive_div_val,
                embedding=self.token_embedding if adaptive_tie_weights else None,
                dtype=dtype,
                name="adaptive_softmax",
            )

        # === Functional Model ===
        tokens = keras.Input(
            shape=(block_size,),
            batch_size=batch_size,
            dtype="int32",
            name="tokens",
        )
        logits, _ = self._forward(tokens)
        if adaptive_cutoffs is not None:
            # Not in the functional graph (`compute_loss` and
            # `call_with_memory` call it): built here, tracked below.
            self.adaptive_softmax.build((batch_size, block_size, hidden_dim))
        super().__init__(inputs=tokens, outputs=logits, dtype=dtype, **kwargs)
        if adaptive_cutoffs is not None:
            self.adaptive_softmax = self.adaptive_softmax

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.persistent_memory_size = persistent_memory_size
        self.max_span = max_span
        self.block_size = block_size
        self.batch_size = batch_size
        self.adaptive_span = adaptive_span
        self.span_ramp = span_ramp
        self.span_init = span_init
        self.span_loss_coeff = span_loss_coeff
        self.dropout = dropout
        self.embedding_dropout = embedding_dropout
        self.feedforward_dim = feedforward_dim
        self.integration = integration
        self.implementation = implementation
        self.span_granularity = span_granularity
        self.remat = remat
        self.adaptive_cutoffs = adaptive_cutoffs
        self.adaptive_div_val = adaptive_div_val
        self.adaptive_tie_weights = adaptive_tie_weights

    def __setattr__(self, name, value):
        # The torch backend's Module refuses layer attributes before
        # `Model.__init__` has made it a Module; the functional graph tracks
        # those layers anyway. From then on torch must see every attribute,
        # or `parameters()` (what DistributedDataParallel reads) is empty.
        if keras.backend.backend() == "torch" and "_modules" not in vars(self):
            return object.__setattr__(self, name, value)
        return super().__setattr__(name, value)

    def _forward(self, tokens, memories=None, training=None):
        """The network; stateful when `memories` is None, else stateless.

        Returns:
            `(logits, next_memories)`, with the final hidden states instead
            of logits when there is an adaptive softmax; `next_memories` is
            empty when the memory variables were used (and updated).
        """
        hidden = self.token_embedding(tokens)  # (B, M, d)
        hidden = self.embedding_dropout_layer(hidden, training=training)
        positions = self.relative_position(hidden)  # (D, L)
        next_memories = []
        for i, attention in enumerate(self.attention_layers):
            memory_layer = self.segment_memories[i]
            if memories is None:
                memory = memory_layer(hidden)  # (B, L, d), state updated
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
        if self.adaptive_softmax is not None:
            return hidden, next_memories  # (B, M, d), see `compute_loss`
        logits = self.logits_cast(self.output_dense(hidden))  # (B, M, V)
        return logits, next_memories

    def call(self, inputs, training=None, mask=None):
        check_token_ids(inputs, self.vocabulary_size)
        if inputs.shape[0] is None:
            # `tf.distribute` traces `fit` with batches of unknown size; the
            # memory has exactly `batch_size` rows (a mismatch fails here).
            inputs = ops.reshape(inputs, (self.batch_size, self.block_size))
        return super().call(inputs, training=training, mask=mask)

    def call_with_memory(self, tokens, memories, training=False):
        """Runs the network on explicit segment memories (stateless).

        The memory variables are neither read nor written, so this serves
        generation (one token at a time over the memory) and serving.

        Args:
            tokens: int token ids `(B, T)`, any batch `B` and length `T`.
            memories: a list of `num_layers` tensors `(B, max_span, d)`,
                e.g. `initial_memories(B)` at the start of the streams.
            training: bool, whether dropout is active.

        Returns:
            `(logits, next_memories)`: float32 logits `(B, T, V)` (with an
            adaptive softmax, log-probabilities) and the memories after
            these tokens, in the same layout.
        """
        if len(memories) != self.num_layers:
            raise ValueError(
                f"`memories` must hold num_layers={self.num_layers} tensors. "
                f"Received: {len(memories)} tensors"
            )
        tokens = ops.convert_to_tensor(tokens, "int32")
        if len(tokens.shape) != 2:
            raise ValueError(
                "`tokens` must have shape (batch, length). "
                f"Received: tokens.shape={tuple(tokens.shape)}"
            )
        expected = (tokens.shape[0], self.max_span, self.hidden_dim)
        for i, memory in enumerate(memories):
            if tuple(memory.shape) != expected:
                raise ValueError(
                    f"`memories[{i}]` must have shape {expected}. "
                    f"Received: shape={tuple(memory.shape)}"
                )
        check_token_ids(tokens, self.vocabulary_size)
        outputs, next_memories = self._forward(tokens, memories, training=training)
        if self.adaptive_softmax is not None:
            outputs = self.adaptive_softmax(outputs)  # (B, T, V) log-probs
        return outputs, next_memories

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The loss of `fit` and `evaluate`.

        Without an adaptive softmax, Keras's: the compiled loss plus the
        losses added with `add_loss`. With one, `y_pred` holds the final
        hidden states and the loss is the mean negative log-likelihood in
        nats of the targets `y` (`sample_weight`, per token or per row,
        weighs each token's term as in Keras losses: a sum divided by the
        number of tokens), plus the `add_loss` losses (the span loss).
        """
        if self.adaptive_softmax is None:
            return super().compute_loss(
                x, y, y_pred, sample_weight, training=training
            )
        if self._compile_loss is not None or self._compile_metrics is not None:
            compiled = self._compile_config.config
            raise ValueError(
                "A model with an adaptive softmax computes its own loss (the "
                "targets' negative log-likelihood) and outputs hidden states, "
                "not logits: compile it with `loss=None` and no metrics. "
                f"Received: loss={compiled['loss']!r}, "
                f"metrics={compiled['metrics']!r}, "
                f"weighted_metrics={compiled['weighted_metrics']!r}"
            )
        if y is None:
            raise ValueError(
                "A model with an adaptive softmax needs targets `y` (token "
                "ids, shape (batch_size, block_size)) for its loss. "
                "Received: y=None"
            )
        nll = -self.adaptive_softmax(y_pred, targets=y)  # (B, M) float32
        if sample_weight is not None:
            weight = ops.cast(sample_weight, "float32")
            while len(weight.shape) < len(nll.shape):
                weight = ops.expand_dims(weight, -1)
            nll = nll * weight
        loss = ops.mean(nll)
        if self.losses:
            loss = loss + super().compute_loss(x, training=training)
        return loss

    def generate(
        self, prompt, max_length, sampler="greedy", stop_token_ids=None,
        tokenizer=None, verbose="auto",
    ):
        """Continues prompts token by token with a keras-hub sampler.

        The prompt is read block by block (`block_size` tokens per call of
        `call_with_memory`, the segment memory carried); then each new token
        costs one call on a length-1 input over the memory. The decoding
        loop is compiled: XLA on TensorFlow, `jax.jit` on JAX; on PyTorch
        the decoding step and the prompt reading go through `torch.compile`
        while the sampler's loop stays a Python loop. The model's own memory
        variables are neither read nor changed. See
        `keras_allattn.models.generation`.

        Args:
            prompt: token ids, `(length,)` or `(batch, length)` ints, or a
                list of id lists of different lengths; or, with a tokenizer,
                a string or a list of strings.
            max_length: int, the length of every output: prompt plus new
                tokens.
            sampler: a name, one of "greedy", "top_k", "top_p", "beam",
                "random" (keras-hub defaults; one instance per name and
                model, so random samplers do not repeat), or a
                `keras_hub.samplers` instance of those classes.
            stop_token_ids: None, or token ids that end a row; positions
                after a row's first new stop token repeat it (ids) or are
                cut (text, stop token excluded).
            tokenizer: a keras-hub tokenizer for text prompts (e.g.
                `keras_hub.tokenizers.ByteTokenizer(lowercase=False)`, or
                `keras_allattn.tokenizers.corpus_tokenizer(corpus)`);
                defaults to the model's `tokenizer` attribute when it has
                one.
            verbose: 0 (silent), 1 or "auto" (a `keras.utils.Progbar` of
                the positions read and generated), 2 (one line at the end).

        Returns:
            int32 token ids `(max_length,)` or `(batch, max_length)`,
            prompt included; for text prompts, the text (a string or a list
            of strings).

        Example:

        >>> model = AllAttentionLM(vocabulary_size=256, num_layers=1,
        ...     hidden_dim=16, num_heads=2, persistent_memory_size=4,
        ...     max_span=16, block_size=8, batch_size=1)
        >>> model.generate(np.array([72, 105]), max_length=6).shape
        (6,)
        """
        if tokenizer is None:
            tokenizer = getattr(self, "tokenizer", None)
        from keras_allattn.models.generation import generate

        return generate(
            self, prompt, max_length, sampler=sampler,
            stop_token_ids=stop_token_ids, tokenizer=tokenizer,
            verbose=verbose,
        )

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

    def update_span_trimming(self, margin=64):
        """Sets each layer's attended memory length from its learned spans.

        The length is the layer's largest current span plus `margin`,
        rounded up to a multiple of `span_granularity` and capped at
        `max_span`. It grows as soon as a span exceeds it and shrinks only
        when the target falls below it, so spans that hover near a boundary
        do not cause repeated retraces. Compiled functions are rebuilt when
        a length changes.

        Returns:
            bool, whether any length changed.
        """
        if not self.adaptive_span:
            return False
        changed = False
        for attention, largest in zip(
            self.attention_layers, self.current_spans().max(axis=1)
        ):
            step = self.span_granularity
            target = min(self.max_span, math.ceil((largest + margin) / step) * step)
            if attention.attended_span < largest or target < attention.attended_span:
                if target != attention.attended_span:
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

    def fit(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if self.adaptive_span and not any(
            isinstance(c, SpanTrimming) for c in callbacks
        ):
            callbacks.append(SpanTrimming())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def evaluate(self, *args, **kwargs):
        self.update_span_trimming()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self.update_span_trimming()
        return super().predict(*args, **kwargs)

    @classmethod
    def presets(cls):
        """Preset names mapped to their one-line descriptions."""
        return {
            name: preset_table.PRESETS[name]["description"]
            for name in preset_table.preset_names()
        }

    @classmethod
    def from_preset(cls, name, **overrides):
        """A new model with the geometry of preset `name` (SPEC §5).

        Args:
            name: a name from `AllAttentionLM.presets()`.
            **overrides: constructor arguments replacing the preset's, e.g.
                `batch_size=8, max_span=2048, dtype="mixed_bfloat16"`.

        Returns:
            An `AllAttentionLM` with freshly initialised weights. The
            preset's training recipe is `keras_allattn.presets.get_preset(
            name)["recipe"]`.
        """
        preset = preset_table.get_preset(name)
        preset_table.check_buildable(name)
        return cls(**{**preset["model"], **overrides})

    def get_config(self):
        return {
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "persistent_memory_size": self.persistent_memory_size,
            "max_span": self.max_span,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "adaptive_span": self.adaptive_span,
            "span_ramp": self.span_ramp,
            "span_init": self.span_init,
            "span_loss_coeff": self.span_loss_coeff,
            "dropout": self.dropout,
            "embedding_dropout": self.embedding_dropout,
            "feedforward_dim": self.feedforward_dim,
            "integration": self.integration,
            "implementation": self.implementation,
            "span_granularity": self.span_granularity,
            "remat": self.remat,
            "adaptive_cutoffs": self.adaptive_cutoffs,
            "adaptive_div_val": self.adaptive_div_val,
            "adaptive_tie_weights": self.adaptive_tie_weights,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)


class SpanTrimming(keras.callbacks.Callback):
    """Keeps `AllAttentionLM`'s memory trimming in step with learned spans.

    Calls `model.update_span_trimming()` when training starts and after
    every `update_every` batches; `AllAttentionLM.fit` adds it for models
    with adaptive span. Reading the spans waits for the step to finish;
    with `update_every > 1` a span may outgrow its trimmed length by more
    than the margin between two checks, so leave it at 1 for exact results.

    Args:
        update_every: int, batches between two updates.
    """

    def __init__(self, update_every=1):
        super().__init__()
        self.update_every = check_positive("update_every", update_every)

    def _update(self):
        if keras.backend.backend() == "jax":
            self.model.jax_state_sync()
        self.model.update_span_trimming()

    def on_train_begin(self, logs=None):
        self._update()

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.update_every == 0:
            self._update()


def _is_concrete(x):
    """Whether `x` holds values that can be read now (not traced)."""
    if isinstance(x, keras.KerasTensor):
        return False
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "torch":
        import torch

        # Fake tensors: traced by `make_fx` (see `generation.torch_compile`).
        return not (
            torch.compiler.is_compiling()
            or isinstance(x, torch._subclasses.FakeTensor)
        )
    return True


def check_token_ids(tokens, vocabulary_size):
    """Raises ValueError for ids outside [0, vocabulary_size), when eager."""
    if not _is_concrete(tokens):
        return
    values = ops.convert_to_numpy(tokens)
    if values.size and (values.min() < 0 or values.max() >= vocabulary_size):
        bad = values[(values < 0) | (values >= vocabulary_size)][0]
        raise ValueError(
            f"Token ids must lie in [0, vocabulary_size={vocabulary_size}). "
            f"Received: a token id {int(bad)} in `tokens`"
        )
