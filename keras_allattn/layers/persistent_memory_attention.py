import math

import keras
from keras import ops

from keras_allattn.layers.adaptive_span import AdaptiveSpan
from keras_allattn.ops.attention import IMPLEMENTATIONS
from keras_allattn.ops.kernel_settings import INTEGRATIONS
from keras_allattn.ops.random import next_seed
from keras_allattn.ops.attention import all_attention
from keras_allattn.ops.attention import attention_probabilities
from keras_allattn.utils import check_choice
from keras_allattn.utils import check_non_negative
from keras_allattn.utils import check_positive
from keras_allattn.utils import check_rate
from keras_allattn.utils import check_remat
from keras_allattn.utils import check_shape
from keras_allattn.utils import torch_default_uniform


@keras.saving.register_keras_serializable(package="keras_allattn")
class PersistentMemoryAttention(keras.layers.Layer):
    """All-attention: self-attention over a segment memory and persistent vectors.

    Each query attends to the `max_span` positions strictly before it (the
    segment memory of earlier tokens followed by the current block, never
    the token itself) and to `persistent_memory_size` learned key/value
    vectors per head, in one softmax. Context scores add a learned
    relative-position term `q . p_r` (the table comes from a shared
    `RelativePosition` layer); persistent vectors get none. With
    `adaptive_span=True` an `AdaptiveSpan` sublayer masks distant positions
    per head and the weights are renormalised jointly with the persistent
    ones. Dropout is applied to the attention weights. Projections have no
    bias. This is the attention sublayer; the network adds the residual
    connection and layer normalisation.

    When every head's learned span is short, `attended_span` (set by
    `set_attended_span`, normally through
    `AllAttentionLM.update_span_trimming`) restricts the computation to the
    most recent `attended_span` memory rows. As long as it is at least the
    largest current span, the result is unchanged (up to the 1e-8 of the
    renormalisation).

    Every shape is checked when the layer is built and called: a wrong one
    raises `ValueError` naming the argument, the expected and the received
    shape.

    Args:
        num_heads: int, the number of heads `H`; must divide the width.
        max_span: int, the attention span `L` (memory rows attended).
        persistent_memory_size: int >= 0, persistent vectors `N` per head.
        adaptive_span: bool, whether to learn a span per head.
        span_ramp: int, the ramp `R` of the adaptive-span mask.
        span_init: float in [0, 1], the initial span ratio.
        span_loss_coeff: float, weight of the span loss.
        integration: "joint" (one softmax over context and persistent
            scores, the paper's model) or "separate" (two softmaxes whose
            outputs are summed, the paper's ablation).
        dropout: float in [0, 1), dropout rate on the attention weights.
        implementation: "auto" (the fused kernel where one applies),
            "portable" or "fused" (raises where none applies); see
            `keras_allattn.ops.all_attention`.
        remat: what the backward pass recomputes instead of keeping:
            False (nothing), "attention" (or True: the attention scores,
            weights and their products with the values, so that the
            portable path keeps no `(B, H, M, span)` tensor; the fused
            kernels keep none anyway) or "layer" (the whole layer from its
            inputs and memory: the keys and values of the `span + M` rows
            are recomputed too, so a layer keeps about `M x d` values
            instead of `(span + M) x d` several times).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(B, M, d)` hidden states of the current block.
        memory: `(B, S, d)` inputs of this layer for the `S` previous
            tokens of each stream, the most recent last (zeros at a
            stream's start), `S` at least `attended_span` (`max_span`
            unless `set_attended_span` lowered it). Only the last
            `attended_span` rows are used.
        position_keys: `(d / num_heads, max_span)` relative-position table,
            the output of `RelativePosition`.
        training: bool, whether dropout is active.

    Returns:
        `(B, M, d)` attention outputs (after the output projection).

    Example:

    >>> positions = RelativePosition(head_dim=8, max_span=16)
    >>> attention = PersistentMemoryAttention(
    ...     num_heads=4, max_span=16, persistent_memory_size=8)
    >>> x = keras.random.normal((2, 5, 32))
    >>> memory = keras.random.normal((2, 16, 32))
    >>> out = attention(x, memory=memory, position_keys=positions(x))
    >>> tuple(out.shape)
    (2, 5, 32)

    References:
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1907.01470),
          "Augmenting Self-attention with Persistent Memory".
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1905.07799),
          "Adaptive Attention Span in Transformers".
    """

    def __init__(
        self,
        num_heads,
        max_span,
        persistent_memory_size=0,
        adaptive_span=False,
        span_ramp=32,
        span_init=0.0,
        span_loss_coeff=0.0,
        integration="joint",
        dropout=0.0,
        implementation="auto",
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_positive("num_heads", num_heads)
        self.max_span = check_positive("max_span", max_span)
        self.persistent_memory_size = check_non_negative(
            "persistent_memory_size", persistent_memory_size
        )
        self.adaptive_span = bool(adaptive_span)
        self.span_ramp = check_positive("span_ramp", span_ramp)
        self.span_init = span_init
        self.span_loss_coeff = span_loss_coeff
        self.integration = check_choice("integration", integration, INTEGRATIONS)
        self.dropout = check_rate("dropout", dropout)
        self.implementation = check_choice(
            "implementation", implementation, IMPLEMENTATIONS
        )
        self.remat = check_remat(remat)
        self.attended_span = self.max_span
        self.span = None
        if self.adaptive_span:
            self.span = AdaptiveSpan(
                num_heads=self.num_heads,
                max_span=self.max_span,
                span_ramp=self.span_ramp,
                span_init=span_init,
                span_loss_coeff=span_loss_coeff,
                dtype=self.dtype_policy,
                name="adaptive_span",
            )
        self.seed_generator = keras.random.SeedGenerator()

    def build(self, inputs_shape, memory_shape=None, position_keys_shape=None):
        check_shape("inputs", inputs_shape, ("batch", "length", "width"))
        hidden_dim = inputs_shape[-1]
        if hidden_dim is None:
            raise ValueError(
                "The width of `inputs` (last axis) must be known to build "
                f"the layer. Received: inputs.shape={tuple(inputs_shape)}"
            )
        if hidden_dim % self.num_heads:
            raise ValueError(
                "The input width must be divisible by `num_heads`. Received: "
                f"width={hidden_dim}, num_heads={self.num_heads}"
            )
        self.hidden_dim = hidden_dim
        self.head_dim = hidden_dim // self.num_heads
        self.query_dense = self._projection("query")
        self.key_dense = self._projection("key")
        self.value_dense = self._projection("value")
        self.output_dense = self._projection("output")
        if self.persistent_memory_size:
            shape = (self.num_heads, self.persistent_memory_size, self.head_dim)
            self.persistent_keys = self.add_weight(
                name="persistent_keys",
                shape=shape,
                initializer=keras.initializers.RandomNormal(
                    stddev=1.0 / math.sqrt(self.head_dim)
                ),
            )
            self.persistent_values = self.add_weight(
                name="persistent_values",
                shape=shape,
                initializer=keras.initializers.RandomNormal(
                    stddev=1.0 / math.sqrt(self.persistent_memory_size)
                ),
            )
        if self.span is not None:
            self.span.build()
        self._check_shapes(inputs_shape, memory_shape, position_keys_shape)
        self.built = True

    def _check_shapes(self, inputs_shape, memory_shape, position_keys_shape,
                      rows=None):
        """Raises ValueError naming the first argument of a wrong shape.

        `memory` needs `rows` rows or more: by default the attended span
        (what `call` uses)."""
        width = self.hidden_dim
        check_shape("inputs", inputs_shape, ("batch", "length", width))
        if memory_shape is not None:
            batch = inputs_shape[0]
            if rows is None:
                rows = self.attended_span
            needed = (f"max_span={rows}" if rows == self.max_span
                      else f"attended_span={rows}")
            check_shape(
                "memory",
                memory_shape,
                ("batch" if batch is None else batch, f"{needed} or more", width),
            )
            if memory_shape[1] is not None and memory_shape[1] < rows:
                raise ValueError(
                    f"`memory` must have at least {needed} rows. "
                    f"Received: memory.shape={tuple(memory_shape)}"
                )
        if position_keys_shape is not None:
            check_shape(
                "position_keys",
                position_keys_shape,
                (self.head_dim, self.max_span),
            )

    def _projection(self, name):
        dense = keras.layers.Dense(
            self.hidden_dim,
            use_bias=False,
            kernel_initializer=torch_default_uniform(self.hidden_dim),
            dtype=self.dtype_policy,
            name=name,
        )
        dense.build((None, None, self.hidden_dim))
        return dense

    def set_attended_span(self, attended_span):
        """Restricts attention to the latest `attended_span` memory rows.

        Exact while it is at least every head's current span. Compiled
        functions that captured the previous value must be retraced.
        """
        attended_span = check_positive("attended_span", attended_span)
        if attended_span > self.max_span:
            raise ValueError(
                "`attended_span` must be at most `max_span`="
                f"{self.max_span}. Received: attended_span={attended_span}"
            )
        self.attended_span = attended_span

    def _split_heads(self, x):
        length = x.shape[1]
        return ops.reshape(x, (-1, length, self.num_heads, self.head_dim))

    def call(self, inputs, memory, position_keys, training=None):
        self._check_shapes(inputs.shape, memory.shape, position_keys.shape)
        length = self.attended_span
        memory = memory[:, memory.shape[1] - length :]
        positions = position_keys[:, self.max_span - length :]  # (D, A)
        # State changes (the span loss, the seed generator's step) happen
        # here, outside what remat may recompute.
        if self.span is not None:
            self.span.add_span_loss()
        dropout = bool(training) and self.dropout > 0
        # A seed drawn outside keeps recomputation (remat) identical.
        seeds = (next_seed(self.seed_generator),) if dropout else ()
        if self.remat != "layer":
            return self._layer(inputs, memory, positions, *seeds)
        if keras.backend.backend() != "torch":
            return keras.remat(self._layer)(inputs, memory, positions, *seeds)
        # PyTorch: the recomputation runs when the backward needs it, on
        # the autograd engine's thread (a device thread on CUDA), where a
        # `keras.StatelessScope` of the caller (the compiled training step
        # traces under one) is not active: it would read the variables
        # themselves, not the values the forward read. So the values go in
        # as arguments and the recomputed layer reads them from a scope of
        # its own.
        variables = list(self.variables)
        values = [variable.value for variable in variables]
        count = len(seeds)

        def layer(inputs, memory, positions, *rest):
            mapping = list(zip(variables, rest[count:]))
            with keras.StatelessScope(state_mapping=mapping):
                return self._layer(inputs, memory, positions, *rest[:count])

        return keras.remat(layer)(inputs, memory, positions, *seeds, *values)

    def _attention_tensors(self, inputs, memory, positions):
        """The attention's tensor arguments by name (those in use): the
        projections of `inputs` and `[memory; inputs]`, the persistent
        vectors as used and the span ratios."""
        memory = ops.cast(memory, inputs.dtype)
        context = ops.concatenate([memory, inputs], axis=1)  # (B, A+M, d)
        tensors = {
            "query": self._split_heads(self.query_dense(inputs)),
            "key": self._split_heads(self.key_dense(context)),
            "value": self._split_heads(self.value_dense(context)),
            "position_keys": positions,
        }
        if self.persistent_memory_size:
            tensors["persistent_keys"] = ops.cast(
                self.persistent_keys, self.compute_dtype
            ) * math.sqrt(self.head_dim)
            tensors["persistent_values"] = ops.cast(
                self.persistent_values, self.compute_dtype
            ) * math.sqrt(self.persistent_memory_size)
        if self.span is not None:
            tensors["span_ratio"] = ops.convert_to_tensor(self.span.span_ratio)
        return tensors

    def attention_probabilities(self, inputs, memory, position_keys):
        """The attention weights of an evaluation call (no dropout).

        The weights the layer gives, for every query, to the `max_span`
        previous positions and to its persistent vectors: the same
        projections, persistent vectors, span mask and renormalisation as
        `call`, through `keras_allattn.ops.attention_probabilities` (the
        portable path's math). All `max_span` rows of the memory are
        scored, whatever the attended span (rows beyond it get weight 0).

        Args:
            inputs: `(B, M, d)` hidden states of the current block.
            memory: `(B, S, d)` with `S >= max_span` (all `max_span` rows are
                used here, whatever the attended span).
            position_keys: `(d / num_heads, max_span)`, as in `call`.

        Returns:
            `(context, persistent)`: float32 `(B, H, M, max_span)`, column
            `c` for distance `max_span - c` (the oldest first), and
            `(B, H, M, N)`, or None without persistent vectors.
        """
        self._check_shapes(inputs.shape, memory.shape, position_keys.shape,
                           rows=self.max_span)
        memory = memory[:, memory.shape[1] - self.max_span :]
        tensors = self._attention_tensors(inputs, memory, position_keys)
        tensors.pop("value")
        tensors.pop("persistent_values", None)
        return attention_probabilities(
            **tensors,
            max_span=self.max_span,
            span_ramp=self.span_ramp,
            integration=self.integration,
        )

    def _layer(self, inputs, memory, positions, *seeds):
        """Projections, attention and output projection on the attended
        memory rows; `seeds`: the dropout seed when dropout is active."""
        tensors = self._attention_tensors(inputs, memory, positions)
        if seeds:
            tensors["dropout_seed"] = seeds[0]
        names = list(tensors)

        def attend(*values):
            return all_attention(
                **dict(zip(names, values)),
                max_span=self.max_span,
                span_ramp=self.span_ramp,
                integration=self.integration,
                dropout_rate=self.dropout if seeds else 0.0,
                implementation=self.implementation,
            )

        if self.remat == "attention":
            attend = keras.remat(attend)
        out = attend(*tensors.values())  # (B, M, H, D)
        out = ops.reshape(out, (-1, inputs.shape[1], self.hidden_dim))
        return self.output_dense(out)

    def compute_output_shape(self, inputs_shape, *args, **kwargs):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "max_span": self.max_span,
                "persistent_memory_size": self.persistent_memory_size,
                "adaptive_span": self.adaptive_span,
                "span_ramp": self.span_ramp,
                "span_init": self.span_init,
                "span_loss_coeff": self.span_loss_coeff,
                "integration": self.integration,
                "dropout": self.dropout,
                "implementation": self.implementation,
                "remat": self.remat,
            }
        )
        return config
