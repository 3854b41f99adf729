import keras
from keras import ops

from keras_allattn.layers.adaptive_embedding import AdaptiveEmbedding
from keras_allattn.layers.adaptive_clusters import add_cluster_weights
from keras_allattn.layers.adaptive_clusters import set_cluster_geometry
from keras_allattn.utils import check_last_axis
from keras_allattn.utils import check_positive


@keras.saving.register_keras_serializable(package="keras_allattn")
class AdaptiveSoftmax(keras.layers.Layer):
    """Adaptive softmax: exact log-probabilities, cheap for rare tokens.

    The vocabulary, ordered by decreasing frequency, is split by `cutoffs`
    into a shortlist `[0, c_1)` and tail clusters `[c_1, c_2), ...,
    [c_k, V)`. The head is a softmax over the shortlist plus one logit per
    tail cluster; tail cluster `i` has its own softmax over its tokens, at
    width `hidden_dim // div_val**i` after a projection. The
    log-probability of a tail token is the head's log-probability of its
    cluster plus its log-probability within the cluster, so the
    distribution is exactly normalised over the vocabulary. Cluster `i`'s
    logits are `(h P_i^T) W_i^T + b_i`, with `P_i` of shape
    `(width_i, hidden_dim)` (none when `div_val=1`) and `W_i` of shape
    `(cluster size, width_i)`; the head adds the cluster rows
    `cluster_kernel` (cluster `i` at row `i - 1`; Transformer-XL stores
    them in reverse order) and `cluster_bias`.

    With `embedding` (an `AdaptiveEmbedding` of the same geometry) the
    `W_i` and `P_i` are that layer's variables themselves (tied weights,
    as in Transformer-XL, whose WikiText-103 set-up however leaves the
    first cluster's projection untied): one variable per matrix, read by
    both layers, whose gradient sums both uses. The output biases and the
    cluster rows always belong to this layer.

    Called with targets it returns the log-probability of each target only
    and never builds a `(positions, V)` tensor: the positions are cut into
    equal chunks of at most `chunk_size`, processed by a loop
    (`keras.ops.map`, one chunk at a time) and recomputed in the backward
    pass (`keras.remat`) instead of kept. Beyond its inputs it needs about
    one chunk's logits over the head and every tail cluster,
    `chunk_size x (V + clusters)` float32 values, and as many for their
    gradients, whatever the number of positions: at WikiText-103's
    vocabulary and the default 1024, about 1 GiB each (XLA plans 2.1 GiB
    of temporary buffers for the forward and backward pass over 64 x 256
    positions at width 512, against 49 GiB for a full softmax). Every
    position gets the normaliser of every cluster, so the result is exact
    with static shapes (no gather of the positions whose target is in a
    cluster, which would need dynamic shapes under `jit`); the arithmetic
    is that of the reduced widths, `positions x sum_i size_i x width_i`
    multiply-adds plus the projections, about 7x fewer than a full softmax
    over WikiText-103 at width 512. Called without targets it returns the
    log-probabilities of the whole vocabulary `(..., V)`, for generation
    and serving (not chunked).

    Args:
        vocabulary_size: int, number of token ids `V`, most frequent first.
        hidden_dim: int, the input width `d`.
        cutoffs: list of ints, strictly increasing in `[1, V)`: the first
            id of every tail cluster. `[]` gives a plain softmax.
        div_val: int >= 1, the width divisor from one cluster to the next.
        embedding: None for untied output weights, or an
            `AdaptiveEmbedding` with the same `vocabulary_size`,
            `hidden_dim`, `cutoffs` and `div_val`, whose matrices this layer
            then shares (it becomes a sublayer, saved once).
        chunk_size: int, positions per chunk of the target path.
        kernel_initializer: initializer of untied output matrices and of
            the cluster rows (normal, standard deviation 0.02, as in
            Transformer-XL).
        projection_initializer: initializer of untied projections (normal,
            0.01).
        bias_initializer: initializer of the output and cluster biases.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(..., hidden_dim)` hidden states.
        targets: None, or int token ids `(...)`, the same leading shape.
        A wrong shape raises `ValueError` naming the argument.

    Returns:
        float32 log-probabilities: of each target, shape `(...)`, when
        `targets` is given; else of every token, `(..., V)`.

    Example:

    >>> embedding = AdaptiveEmbedding(100, 16, cutoffs=[20, 60], div_val=2)
    >>> softmax = AdaptiveSoftmax(100, 16, cutoffs=[20, 60], div_val=2,
    ...     embedding=embedding)
    >>> hidden = embedding(keras.ops.array([[1, 30, 90]]))
    >>> tuple(softmax(hidden).shape)
    (1, 3, 100)
    >>> tuple(softmax(hidden, targets=keras.ops.array([[30, 90, 2]])).shape)
    (1, 3)

    References:
        - [Grave et al., 2017](https://arxiv.org/abs/1609.04309),
          "Efficient softmax approximation for GPUs".
        - [Baevski & Auli, 2018](https://arxiv.org/abs/1809.10853),
          "Adaptive Input Representations for Neural Language Modeling".
        - [Dai et al., 2019](https://arxiv.org/abs/1901.02860),
          "Transformer-XL" (`ProjectedAdaptiveLogSoftmax`).
    """

    def __init__(
        self,
        vocabulary_size,
        hidden_dim,
        cutoffs,
        div_val=4,
        embedding=None,
        chunk_size=1024,
        kernel_initializer=None,
        projection_initializer=None,
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        set_cluster_geometry(self, vocabulary_size, hidden_dim, cutoffs, div_val)
        self.chunk_size = check_positive("chunk_size", chunk_size)
        if embedding is not None:
            if not isinstance(embedding, AdaptiveEmbedding):
                raise ValueError(
                    "`embedding` must be None or an `AdaptiveEmbedding`. "
                    f"Received: embedding={embedding!r}"
                )
            mine = (self.vocabulary_size, self.hidden_dim, self.cutoffs,
                    self.div_val)
            theirs = (embedding.vocabulary_size, embedding.hidden_dim,
                      embedding.cutoffs, embedding.div_val)
            if mine != theirs:
                raise ValueError(
                    "`embedding` must have the same (vocabulary_size, "
                    "hidden_dim, cutoffs, div_val) to be tied. Received: "
                    f"{theirs} for the embedding and {mine} here"
                )
        self.embedding = embedding
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or keras.initializers.RandomNormal(stddev=0.02)
        )
        self.projection_initializer = keras.initializers.get(
            projection_initializer or keras.initializers.RandomNormal(stddev=0.01)
        )
        self.bias_initializer = keras.initializers.get(bias_initializer)

    @property
    def num_clusters(self):
        """The number of tail clusters (`len(cutoffs)`)."""
        return len(self.cutoffs)

    def build(self, inputs_shape=None, targets_shape=None):
        self.output_kernels = []
        self.output_projections = []
        if self.embedding is not None:
            if not self.embedding.built:
                self.embedding.build()
        else:
            self.output_kernels, self.output_projections = add_cluster_weights(
                self, self.bounds, self.widths, self.hidden_dim, self.div_val,
                "kernel", self.kernel_initializer, self.projection_initializer,
            )
        self.output_biases = [
            self.add_weight(
                name=f"bias_{i}",
                shape=(self.bounds[i + 1] - self.bounds[i],),
                initializer=self.bias_initializer,
            )
            for i in range(len(self.widths))
        ]
        if self.num_clusters:
            self.cluster_kernel = self.add_weight(
                name="cluster_kernel",
                shape=(self.num_clusters, self.widths[0]),
                initializer=self.kernel_initializer,
            )
            self.cluster_bias = self.add_weight(
                name="cluster_bias",
                shape=(self.num_clusters,),
                initializer=self.bias_initializer,
            )
        self.built = True

    def cluster_variables(self):
        """Per cluster `(kernel, bias, projection or None)`, the variables.

        Kernels `(size_i, width_i)` and projections `(width_i, hidden_dim)`
        are the embedding's variables when tied. The head's cluster rows
        (`cluster_kernel`, `cluster_bias`) are not included.
        """
        if self.embedding is not None:
            kernels = self.embedding.cluster_embeddings
            projections = self.embedding.cluster_projections
        else:
            kernels, projections = self.output_kernels, self.output_projections
        return [
            (kernels[i], self.output_biases[i],
             projections[i] if projections else None)
            for i in range(len(self.widths))
        ]

    def _weights(self):
        """`cluster_variables` in the compute dtype, the head's rows added."""
        weights = []
        for i, variables in enumerate(self.cluster_variables()):
            kernel, bias, projection = (
                None if v is None else ops.cast(v, self.compute_dtype)
                for v in variables
            )
            if i == 0 and self.num_clusters:
                rows = ops.cast(self.cluster_kernel, self.compute_dtype)
                kernel = ops.concatenate([kernel, rows], axis=0)
                rows_bias = ops.cast(self.cluster_bias, self.compute_dtype)
                bias = ops.concatenate([bias, rows_bias], axis=0)
            weights.append((kernel, bias, projection))
        return weights

    @staticmethod
    def _logits(hidden, kernel, bias, projection):
        """float32 logits `(n, size)` of one cluster for `hidden` `(n, d)`."""
        if projection is not None:
            hidden = ops.matmul(hidden, ops.transpose(projection))  # (n, d_i)
        logits = ops.matmul(hidden, ops.transpose(kernel)) + bias
        return ops.cast(logits, "float32")

    def call(self, inputs, targets=None):
        check_last_axis("inputs", inputs.shape, self.hidden_dim)
        if targets is not None:
            leading = tuple(inputs.shape)[:-1]
            received = tuple(targets.shape)
            if len(received) != len(leading) or any(
                a is not None and b is not None and a != b
                for a, b in zip(received, leading)
            ):
                raise ValueError(
                    "`targets` must have the leading shape of `inputs`, "
                    f"{leading}. Received: targets.shape={received}, "
                    f"inputs.shape={tuple(inputs.shape)}"
                )
        hidden = ops.cast(inputs, self.compute_dtype)
        leading = ops.shape(hidden)[:-1]
        hidden = ops.reshape(hidden, (-1, self.hidden_dim))  # (n, d)
        if targets is None:
            log_probs = self._all_log_probs(hidden, self._weights())
            return ops.reshape(log_probs, (*leading, self.vocabulary_size))
        targets = ops.reshape(ops.cast(targets, "int32"), (-1,))  # (n,)
        weights = [w for cluster in self._weights() for w in cluster
                   if w is not None]  # flat: `keras.remat` takes tensors

        def chunk(hidden, targets):
            # Recomputed in the backward pass; the int targets are closed
            # over (no gradient), the float tensors are arguments.
            recomputed = keras.remat(
                lambda hidden, *weights: self._target_log_probs(
                    hidden, targets, *weights
                )
            )
            return recomputed(hidden, *weights)

        count = hidden.shape[0]
        if count is None or count <= self.chunk_size:
            return ops.reshape(chunk(hidden, targets), leading)
        # A loop over equal chunks (the last one padded), so that one chunk's
        # logits are alive at a time: compilers run loop steps in order.
        chunks = -(-count // self.chunk_size)
        size = -(-count // chunks)
        padding = chunks * size - count
        hidden = ops.reshape(
            ops.pad(hidden, [[0, padding], [0, 0]]), (chunks, size, -1)
        )
        targets = ops.reshape(ops.pad(targets, [[0, padding]]), (chunks, size))
        log_probs = ops.map(lambda xs: chunk(*xs), (hidden, targets))
        return ops.reshape(ops.reshape(log_probs, (-1,))[:count], leading)

    def _unflatten(self, weights):
        """Inverse of the flattening in `call`: `(kernel, bias, proj)` each."""
        weights = list(weights)
        per_cluster = 3 if self.div_val > 1 else 2
        grouped = [weights[i : i + per_cluster]
                   for i in range(0, len(weights), per_cluster)]
        return [(k, b, p[0] if p else None) for k, b, *p in grouped]

    def _target_log_probs(self, hidden, targets, *weights):
        """log p(target) `(n,)` for `hidden` `(n, d)` and `targets` `(n,)`."""
        weights = self._unflatten(weights)
        shortlist = self.bounds[1]
        head = self._logits(hidden, *weights[0])  # (n, shortlist + clusters)
        cluster = ops.zeros_like(targets)
        for cutoff in self.cutoffs:
            cluster = cluster + ops.cast(targets >= cutoff, "int32")
        # The head column of a target: itself in the shortlist, else the
        # column of its cluster.
        column = ops.where(cluster == 0, targets, shortlist + cluster - 1)
        log_probs = _pick(head, column) - ops.logsumexp(head, axis=-1)
        for i in range(1, len(self.widths)):
            low, high = self.bounds[i], self.bounds[i + 1]
            tail = self._logits(hidden, *weights[i])  # (n, size_i)
            local = ops.clip(targets - low, 0, high - low - 1)
            tail_log_probs = _pick(tail, local) - ops.logsumexp(tail, axis=-1)
            log_probs = log_probs + ops.where(cluster == i, tail_log_probs, 0.0)
        return log_probs

    def _all_log_probs(self, hidden, weights):
        """log p of every token `(n, V)` for `hidden` `(n, d)`."""
        shortlist = self.bounds[1]
        head = ops.log_softmax(self._logits(hidden, *weights[0]), axis=-1)
        parts = [head[:, :shortlist]]
        for i in range(1, len(self.widths)):
            tail = ops.log_softmax(self._logits(hidden, *weights[i]), axis=-1)
            parts.append(head[:, shortlist + i - 1 : shortlist + i] + tail)
        return ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def compute_output_shape(self, inputs_shape, targets_shape=None):
        if targets_shape is None:
            return (*inputs_shape[:-1], self.vocabulary_size)
        return tuple(inputs_shape[:-1])

    def compute_output_spec(self, inputs, targets=None):
        shape = self.compute_output_shape(
            inputs.shape, None if targets is None else targets.shape
        )
        return keras.KerasTensor(shape, dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "hidden_dim": self.hidden_dim,
                "cutoffs": list(self.cutoffs),
                "div_val": self.div_val,
                "embedding": (
                    None
                    if self.embedding is None
                    else keras.saving.serialize_keras_object(self.embedding)
                ),
                "chunk_size": self.chunk_size,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "projection_initializer": keras.initializers.serialize(
                    self.projection_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("embedding") is not None:
            config["embedding"] = keras.saving.deserialize_keras_object(
                config["embedding"]
            )
        return cls(**config)


def _pick(logits, index):
    """`logits[n, index[n]]` for `logits` `(n, k)` and `index` `(n,)`."""
    return ops.take_along_axis(logits, index[:, None], axis=-1)[:, 0]
