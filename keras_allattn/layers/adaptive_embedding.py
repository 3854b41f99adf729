import math

import keras
from keras import ops

from keras_allattn.layers.adaptive_clusters import add_cluster_weights
# `check_cutoffs` and `cluster_widths` were defined here: still importable.
from keras_allattn.layers.adaptive_clusters import check_cutoffs  # noqa: F401
from keras_allattn.layers.adaptive_clusters import cluster_widths  # noqa: F401
from keras_allattn.layers.adaptive_clusters import set_cluster_geometry


@keras.saving.register_keras_serializable(package="keras_allattn")
class AdaptiveEmbedding(keras.layers.Layer):
    """Adaptive input embeddings: narrower vectors for rarer tokens.

    The vocabulary is ordered by decreasing frequency and split by `cutoffs`
    into clusters `[0, c_1), [c_1, c_2), ..., [c_k, vocabulary_size)`.
    Cluster `i` embeds its tokens at width `hidden_dim // div_val**i` and
    projects them to `hidden_dim`; the result is scaled by
    `sqrt(hidden_dim)`. With `div_val=1` every cluster has width
    `hidden_dim` and no projection (one plain embedding, split in slices);
    with `div_val > 1` every cluster, the first included, has a projection,
    as in Transformer-XL. `AdaptiveSoftmax(embedding=...)` shares these
    matrices with the output layer.

    Initialisation follows Transformer-XL: embeddings normal with standard
    deviation 0.02, projections 0.01.

    Args:
        vocabulary_size: int, number of token ids `V`, most frequent first.
        hidden_dim: int, the output width `d`.
        cutoffs: list of ints, strictly increasing in `[1, V)`: the first
            id of every cluster after the first. `[]` gives one cluster.
        div_val: int >= 1, the width divisor from one cluster to the next.
        embeddings_initializer: initializer of the cluster embeddings.
        projection_initializer: initializer of the projections.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: int token ids of any shape `(...)` (a float tensor raises
            `ValueError`).

    Returns:
        `(..., hidden_dim)` embeddings, scaled by `sqrt(hidden_dim)`.

    Example:

    >>> layer = AdaptiveEmbedding(
    ...     vocabulary_size=100, hidden_dim=16, cutoffs=[20, 60], div_val=2)
    >>> tuple(layer(keras.ops.array([[3, 42, 99]])).shape)
    (1, 3, 16)
    >>> [tuple(w.shape) for w in layer.cluster_embeddings]
    [(20, 16), (40, 8), (40, 4)]

    References:
        - [Baevski & Auli, 2018](https://arxiv.org/abs/1809.10853),
          "Adaptive Input Representations for Neural Language Modeling".
        - [Dai et al., 2019](https://arxiv.org/abs/1901.02860),
          "Transformer-XL" (`AdaptiveEmbedding`).
    """

    def __init__(
        self,
        vocabulary_size,
        hidden_dim,
        cutoffs,
        div_val=4,
        embeddings_initializer=None,
        projection_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        set_cluster_geometry(self, vocabulary_size, hidden_dim, cutoffs, div_val)
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer or keras.initializers.RandomNormal(stddev=0.02)
        )
        self.projection_initializer = keras.initializers.get(
            projection_initializer or keras.initializers.RandomNormal(stddev=0.01)
        )
        self.scale = math.sqrt(self.hidden_dim)

    def build(self, inputs_shape=None):
        self.cluster_embeddings, self.cluster_projections = add_cluster_weights(
            self, self.bounds, self.widths, self.hidden_dim, self.div_val,
            "embeddings", self.embeddings_initializer,
            self.projection_initializer,
        )
        self.built = True

    def call(self, inputs):
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "int" not in dtype:
            raise ValueError(
                "`inputs` must hold integer token ids. Received: inputs with "
                f"dtype {dtype} and shape {tuple(inputs.shape)}"
            )
        ids = ops.cast(inputs, "int32")
        outputs = None
        for i in range(len(self.widths)):
            low, high = self.bounds[i], self.bounds[i + 1]
            local = ops.clip(ids - low, 0, high - low - 1)
            embedded = self._embed(local, i)  # (..., d)
            if self.cutoffs:
                inside = ops.logical_and(ids >= low, ids < high)
                embedded = ops.where(inside[..., None], embedded, 0.0)
            outputs = embedded if outputs is None else outputs + embedded
        return outputs * ops.cast(self.scale, self.compute_dtype)

    def _embed(self, local_ids, cluster):
        """Cluster `cluster`'s embeddings of `local_ids`, projected to `d`."""
        table = ops.cast(self.cluster_embeddings[cluster], self.compute_dtype)
        embedded = ops.take(table, local_ids, axis=0)  # (..., d_i)
        if self.cluster_projections:
            projection = ops.cast(
                self.cluster_projections[cluster], self.compute_dtype
            )
            embedded = ops.matmul(embedded, projection)  # (..., d)
        return embedded

    def compute_output_shape(self, inputs_shape):
        return (*inputs_shape, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "hidden_dim": self.hidden_dim,
                "cutoffs": list(self.cutoffs),
                "div_val": self.div_val,
                "embeddings_initializer": keras.initializers.serialize(
                    self.embeddings_initializer
                ),
                "projection_initializer": keras.initializers.serialize(
                    self.projection_initializer
                ),
            }
        )
        return config
