"""`AllAttentionLM`: the all-attention network with its language-model head.

The network and its segment memory are `AllAttentionBackbone`
(`backbone.py`); this module adds the output head (a dense layer to
logits, or an adaptive softmax), the loss, generation, the stream-order
`fit`, `evaluate` and `predict`, the presets' constructor and the config.
"""

import inspect
import warnings

import keras
import numpy as np
from keras import ops

from keras_allattn import presets as preset_table
from keras_allattn.layers.adaptive_clusters import check_cutoffs
from keras_allattn.layers.adaptive_clusters import cluster_widths
from keras_allattn.layers.adaptive_softmax import AdaptiveSoftmax
from keras_allattn.models.backbone import AllAttentionBackbone
from keras_allattn.ops.attention import IMPLEMENTATIONS
from keras_allattn.ops.kernel_settings import INTEGRATIONS
from keras_allattn.training.callbacks import SpanTrimming
from keras_allattn.utils import check_choice
from keras_allattn.utils import check_known_arguments
from keras_allattn.utils import check_non_negative
from keras_allattn.utils import check_positive
from keras_allattn.utils import check_positive_or_auto
from keras_allattn.utils import check_rate
from keras_allattn.utils import check_remat
from keras_allattn.utils import check_token_ids
from keras_allattn.utils import check_unit_interval
from keras_allattn.utils import torch_default_uniform

# The `keras.Model` arguments a functional model accepts besides `dtype`.
KERAS_MODEL_ARGUMENTS = ("name", "trainable")


@keras.saving.register_keras_serializable(package="keras_allattn")
class AllAttentionLM(AllAttentionBackbone):
    """The all-attention language model (a functional `keras.Model`).

    Token embedding (no absolute positions), `num_layers` all-attention
    layers (`PersistentMemoryAttention` with a residual connection and post
    LayerNorm, epsilon 1e-5) sharing one `RelativePosition` table, and an
    output projection to logits. With `feedforward_dim` set, each layer also
    gets the feed-forward sublayer: the baseline Transformer of the paper's
    comparison (set `persistent_memory_size=0` for the plain baseline).

    The segment memory of every layer (the layer's inputs for the previous
    `max_span` tokens of each of the `batch_size` streams) is carried from
    batch to batch inside `fit`, compiled or not: consecutive batches must
    continue the same streams row by row, and every batch must hold
    exactly `batch_size` rows. So `fit` reads array rows in order (it
    refuses `shuffle=True`; left out, Keras's default is turned off with a
    warning), and `fit`, `evaluate` and `predict` take the model's
    `batch_size` when none is given. `reset_memory()` zeroes the training
    memory; `get_memory()` and `set_memory()` read and write it. The
    stateless `call_with_memory(tokens, memories)` takes and returns the
    memories explicitly, for generation and serving.

    `evaluate` and `predict` (and the validation of `fit`) run on a memory
    of their own: each call starts every stream from zero memory, carries
    it through its batches, and leaves the training memory exactly as it
    was, so evaluating the same held-out batches twice gives the same
    numbers and validation does not change training. A direct call
    `model(tokens)` reads and updates the training memory, like a training
    step.

    The memory is state, not a parameter: it is in `model.variables` but
    not in `model.weights`, so `count_params()`, `summary()`,
    `get_weights()`, `.keras` files, weight files and exported SavedModels
    leave it out, and a loaded model starts from zero memory. Training
    checkpoints (`keras_allattn.training.save_training`) keep it, for an
    exact resume.

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
    span of its heads plus a margin of 64, rounded up by
    `span_granularity` and capped at `max_span`. Each distinct length costs
    a retrace of compiled functions: "auto" (the default) rounds to a step
    relative to the length (at most 8 lengths per doubling, about 40 up to
    8192), an int `s` to a multiple of `s` (at most `max_span / s`
    lengths). `fit` keeps it up to date from spans read one step late,
    without waiting for the step in flight (`SpanTrimming` callback, added
    automatically: a step whose spans outgrew its length by more than the
    headroom is reported), and `evaluate` and `predict` update it before
    they start. It changes no result: the rows left out all have a span
    mask of zero.

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
        implementation: "auto" (the fused kernel where one applies),
            "portable" or "fused" (raises where none applies); see
            `keras_allattn.ops.all_attention`.
        span_granularity: "auto" (default) or a positive int, how the
            attended memory length (the largest span plus 64) is rounded
            up, as every distinct length costs a retrace. "auto": to a
            multiple of a step relative to the length, the largest power
            of two at most an eighth of it and at least 64 (1088 -> 1152,
            2100 -> 2304), so at most 8 distinct lengths per doubling
            (about 40 for `max_span` 8192) and, from 512 rows on, at most
            12.5% more rows than needed. An int `s`: to a multiple of `s`
            (at most `max_span / s` distinct lengths). See
            `keras_allattn.models.backbone.trimmed_length`.
        remat: what the backward pass recomputes instead of keeping
            (gradient checkpointing): "auto" (default), False, "attention"
            (or True) or "layer"; see `PersistentMemoryAttention`. "auto"
            chooses, when `fit` starts, the least recomputation whose
            estimated memory fits the device
            (`keras_allattn.models.memory_estimate`: none where it fits,
            whole layers where only that fits), and raises a ValueError
            saying what to change when nothing fits; `resolved_remat`
            tells the choice.
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
        **kwargs: `keras.Model` arguments: `name` and `trainable`. Any
            other name raises `TypeError` (naming the closest argument).

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
    >>> history = model.fit(x[:, :-1], x[:, 1:], shuffle=False, verbose=0)
    >>> tuple(model.predict(x[:2, :-1], verbose=0).shape)
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
        span_granularity="auto",
        remat="auto",
        adaptive_cutoffs=None,
        adaptive_div_val=4,
        adaptive_tie_weights=True,
        dtype=None,
        **kwargs,
    ):
        check_known_arguments(
            type(self).__name__, kwargs, self._argument_names()
        )
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
        remat = check_remat(remat, allow_auto=True)
        span_granularity = check_positive_or_auto(
            "span_granularity", span_granularity
        )
        if adaptive_cutoffs is not None:
            adaptive_cutoffs = check_cutoffs(
                adaptive_cutoffs, vocabulary_size, "adaptive_cutoffs"
            )
            check_positive("adaptive_div_val", adaptive_div_val)
            cluster_widths(
                hidden_dim, adaptive_cutoffs, adaptive_div_val, "adaptive_div_val"
            )

        # === Layers ===
        self._build_network(
            vocabulary_size, num_layers, hidden_dim, num_heads,
            persistent_memory_size, max_span, batch_size, adaptive_span,
            span_ramp, span_init, span_loss_coeff, dropout,
            embedding_dropout, feedforward_dim, integration, implementation,
            remat, adaptive_cutoffs, adaptive_div_val, dtype,
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
        self.resolved_remat = None if remat == "auto" else remat
        self._remat_checked = False
        self.adaptive_cutoffs = adaptive_cutoffs
        self.adaptive_div_val = adaptive_div_val
        self.adaptive_tie_weights = adaptive_tie_weights

    def make_train_function(self, force=False):
        """Keras's, except on PyTorch with `jit_compile=True`: there the
        whole training step is one compiled graph
        (`keras_allattn.compiling.torch_train_step`)."""
        return self._make_step_function("train", force)

    def make_test_function(self, force=False):
        """Keras's, except on PyTorch with `jit_compile=True`: there the
        evaluation step is one compiled graph
        (`keras_allattn.compiling.torch_eval_step`)."""
        return self._make_step_function("test", force)

    def make_predict_function(self, force=False):
        """Keras's, except on PyTorch with `jit_compile=True`: there the
        prediction step is one compiled graph
        (`keras_allattn.compiling.torch_eval_step`)."""
        return self._make_step_function("predict", force)

    def _make_step_function(self, kind, force):
        """The `{kind}_function` of `fit`, `evaluate` or `predict`."""
        if keras.backend.backend() != "torch" or not self.jit_compile:
            return getattr(super(), f"make_{kind}_function")(force)
        attribute = f"{kind}_function"
        if getattr(self, attribute) is None or force:
            from keras_allattn import compiling

            setattr(self, attribute, (
                compiling.torch_train_step(self) if kind == "train"
                else compiling.torch_eval_step(self, kind)
            ))
        return getattr(self, attribute)

    def _forward(self, tokens, memories=None, training=None):
        """The network and its head; stateful when `memories` is None.

        Returns:
            `(logits, next_memories)`, with the final hidden states instead
            of logits when there is an adaptive softmax; `next_memories` is
            empty when the memory variables were used (and updated).
        """
        hidden, next_memories = self._network(tokens, memories, training)
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

    def attention_statistics(self, tokens, warmup_tokens=None):
        """Attention mass per layer and head on `tokens`: persistent vs
        context, by distance, and the learned spans; see
        `keras_allattn.analysis.attention_statistics`."""
        from keras_allattn.analysis import attention_statistics

        return attention_statistics(self, tokens, warmup_tokens)

    def fit(
        self, x=None, y=None, batch_size=None, epochs=1, verbose="auto",
        callbacks=None, validation_split=0.0, validation_data=None,
        shuffle=None, **kwargs,
    ):
        """`keras.Model.fit`, reading batches in stream order.

        Differences from Keras's defaults, because batch `k + 1` must
        continue every row of batch `k`: rows of array inputs are read in
        order (`shuffle` may only be False; left out, it is turned off with
        a warning), `batch_size` defaults to the model's `batch_size` (the
        only one it accepts), and array inputs (and `validation_data`) must
        hold a whole number of batches. Validation runs on a memory of its
        own (see `evaluate`): the training memory is left as it was. On
        PyTorch with a CUDA device, NumPy arrays (without sample or class
        weights or `validation_split`) and a `StreamDataset` are read
        through a loader of pinned batches (`keras_allattn.compiling.
        pinned_batches`, `pinned_stream`): the same batches in the same
        order, whose copies to the device do not make the host wait for
        the step in flight.
        """
        self.resolve_remat()
        shuffle = self._stream_shuffle(x, shuffle)
        if _array_rows(x) is not None:
            batch_size = self._stream_batch_size("batch_size", batch_size)
            rows = _array_rows(x)
            validation = rows - int(rows * (1.0 - validation_split))
            if validation_split and validation_data is None:
                self._check_rows("x", rows - validation, "rows left for training")
                self._check_rows("x", validation, "rows split off for validation")
            else:
                self._check_rows("x", rows)
        if validation_data is not None:
            validation_x = (
                validation_data[0]
                if isinstance(validation_data, (list, tuple))
                else validation_data
            )
            if _array_rows(validation_x) is not None:
                kwargs["validation_batch_size"] = self._stream_batch_size(
                    "validation_batch_size",
                    kwargs.get("validation_batch_size") or batch_size,
                )
                self._check_rows("validation_data", _array_rows(validation_x))
        callbacks = list(callbacks or [])
        if self.adaptive_span and not any(
            isinstance(c, SpanTrimming) for c in callbacks
        ):
            callbacks.append(SpanTrimming())
        pinned = _pinned_input(self, x, y, batch_size, validation_split, kwargs)
        if pinned is not None:
            x, y, batch_size = pinned, None, None
        parent = super().fit
        return _leave_usable(self, lambda: parent(
            x, y, batch_size=batch_size, epochs=epochs, verbose=verbose,
            callbacks=callbacks, validation_split=validation_split,
            validation_data=validation_data, shuffle=shuffle, **kwargs,
        ))

    def evaluate(self, x=None, y=None, batch_size=None, *args, **kwargs):
        """`keras.Model.evaluate` on a segment memory of its own.

        Every call starts from zero memory, carries it from batch to batch
        (the batches must continue the streams row by row, as in `fit`),
        and leaves the training memory exactly as it was, also when `fit`
        runs it for `validation_data`. `batch_size` defaults to the
        model's `batch_size`.
        """
        if _array_rows(x) is not None:
            batch_size = self._stream_batch_size("batch_size", batch_size)
            self._check_rows("x", _array_rows(x))
        self.update_span_trimming()
        parent = super().evaluate
        with self._separate_memory():
            return _leave_usable(
                self, lambda: parent(x, y, batch_size, *args, **kwargs)
            )

    def predict(self, x, batch_size=None, *args, **kwargs):
        """`keras.Model.predict` on a segment memory of its own.

        As `evaluate`: every call starts from zero memory, carries it
        through its batches, and leaves the training memory as it was;
        `batch_size` defaults to the model's `batch_size`.
        """
        if _array_rows(x) is not None:
            batch_size = self._stream_batch_size("batch_size", batch_size)
            self._check_rows("x", _array_rows(x))
        self.update_span_trimming()
        parent = super().predict
        with self._separate_memory():
            return _leave_usable(
                self, lambda: parent(x, batch_size, *args, **kwargs)
            )

    def _stream_batch_size(self, name, batch_size):
        """The batch size for array inputs: the model's, or an error."""
        if batch_size is None:
            return self.batch_size
        if batch_size != self.batch_size:
            raise ValueError(
                f"`{name}` must be the model's batch_size={self.batch_size} "
                "(the segment memory has one row per stream), or None. "
                f"Received: {name}={batch_size!r}"
            )
        return batch_size

    def _check_rows(self, name, rows, what="rows"):
        """Raises unless `rows` is a whole number of batches."""
        if rows % self.batch_size:
            raise ValueError(
                f"`{name}` must hold a multiple of batch_size="
                f"{self.batch_size} rows (whole batches, each row one "
                f"stream). Received: {rows} {what}"
            )

    def _stream_shuffle(self, x, shuffle):
        """`fit`'s `shuffle`: False; True is refused (stream order)."""
        if shuffle is None:
            # Keras shuffles arrays and finite PyDatasets (the endless
            # StreamDataset is never shuffled); datasets as they come.
            if _array_rows(x) is not None or (
                isinstance(x, keras.utils.PyDataset)
                and x.num_batches is not None
            ):
                warnings.warn(
                    "AllAttentionLM.fit reads the rows of `x` in order "
                    "(shuffle=False): each batch continues the streams of "
                    "the previous one. Pass shuffle=False to say so.",
                    stacklevel=3,
                )
            return False
        if shuffle:
            raise ValueError(
                "`shuffle` must be False for AllAttentionLM.fit: every batch "
                "must continue the streams of the previous batch row by row, "
                "and shuffling would break them. Received: "
                f"shuffle={shuffle!r}"
            )
        return False

    @classmethod
    def _argument_names(cls):
        """The keyword arguments the constructor accepts, a list of names."""
        parameters = inspect.signature(cls.__init__).parameters
        names = [
            name
            for name, parameter in parameters.items()
            if name != "self" and parameter.kind is not parameter.VAR_KEYWORD
        ]
        return names + list(KERAS_MODEL_ARGUMENTS)

    @classmethod
    def presets(cls):
        """Preset names mapped to their one-line descriptions."""
        return {
            name: preset_table.PRESETS[name]["description"]
            for name in preset_table.preset_names()
        }

    @classmethod
    def from_preset(cls, preset, /, **overrides):
        """A new model with the geometry of a preset (SPEC §5).

        Args:
            preset: a name from `AllAttentionLM.presets()` (positional, so
                that `name=` stays the model's name).
            **overrides: constructor arguments replacing the preset's, e.g.
                `batch_size=8, max_span=2048, dtype="mixed_bfloat16"`, and
                the `keras.Model` arguments `name` and `trainable`. An
                unknown name raises `TypeError`.

        Returns:
            An `AllAttentionLM` with freshly initialised weights. The
            preset's training recipe is `keras_allattn.presets.get_preset(
            preset)["recipe"]`.
        """
        table = preset_table.get_preset(preset)
        check_known_arguments(
            f"{cls.__name__}.from_preset({preset!r})",
            overrides,
            cls._argument_names(),
        )
        preset_table.check_buildable(preset)
        return cls(**{**table["model"], **overrides})

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


def _pinned_input(model, x, y, batch_size, validation_split, kwargs):
    """What `fit` trains from instead of `x` and `y` on PyTorch with the
    model on a CUDA device, or None to keep them: NumPy arrays (without
    sample or class weights or `validation_split`, which Keras applies to
    arrays) as `compiling.pinned_batches`, a `StreamDataset` as
    `compiling.pinned_stream`; the same batches in the same order, in
    pinned host memory."""
    from keras_allattn import compiling
    from keras_allattn.data.stream import StreamDataset

    if keras.backend.backend() != "torch" or not _on_cuda(model):
        return None
    if any(kwargs.get(k) is not None for k in ("sample_weight", "class_weight")):
        return None
    if isinstance(x, StreamDataset) and y is None:
        return compiling.pinned_stream(x)
    arrays = isinstance(x, np.ndarray) and (y is None or isinstance(y, np.ndarray))
    if not arrays or validation_split:
        return None
    return compiling.pinned_batches((x,) if y is None else (x, y), batch_size)


def _on_cuda(model):
    """Whether `model`'s variables are on a CUDA device (PyTorch)."""
    variables = model.variables
    return bool(variables) and variables[0].value.device.type == "cuda"


def _array_rows(x):
    """Rows of array inputs (arrays or tensors, or a structure of them).

    None for anything else (a `tf.data.Dataset`, a generator, a
    `PyDataset`, a `DataLoader`): Keras batches those as they come.
    """
    if x is None:
        return None
    leaves = keras.tree.flatten(x) if isinstance(x, (list, tuple, dict)) else [x]
    shapes = [getattr(leaf, "shape", None) for leaf in leaves]
    if not leaves or any(shape is None or len(shape) == 0 for shape in shapes):
        return None
    return int(shapes[0][0])


def _leave_usable(model, run):
    """Runs a Keras loop (`run()`); if it fails, the model stays usable.

    JAX's loops detach the variables' values while they run and put them
    back at the end; a loop that raises in between leaves them empty
    ("'NoneType' object is not callable" at the next use). This puts back
    the loop's last state, or the values from before it.
    """
    if keras.backend.backend() != "jax":
        return run()
    variables = list(model.variables) + list(model.metrics_variables)
    optimizer = getattr(model, "optimizer", None)  # None before compile
    if optimizer is not None and optimizer.built:
        variables += list(optimizer.variables)
    kept = [(variable, variable.value) for variable in variables]
    try:
        return run()
    except BaseException:
        model.jax_state_sync()
        for variable, value in kept:
            try:
                variable.value
            except TypeError:  # detached by the failed loop
                variable.assign(value)
        raise
