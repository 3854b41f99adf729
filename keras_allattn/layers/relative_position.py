import keras

from keras_allattn.utils import check_positive


@keras.saving.register_keras_serializable(package="keras_allattn")
class RelativePosition(keras.layers.Layer):
    """Learned relative-position keys, one table shared by all layers.

    Holds the table `P` of shape `(head_dim, max_span)` whose column
    `max_span - r` is the key `p_r` of distance `r = 1 .. max_span`. A query
    `q` at distance `r` from a key adds `q . p_r` to its attention score.
    The same table serves every head and every attention layer of a network:
    create the layer once and pass its output to each
    `PersistentMemoryAttention` layer.

    Args:
        head_dim: int, the width `D` of one attention head.
        max_span: int, the maximum attention span `L`.
        initializer: initializer of the table; standard normal as in the
            reference implementation.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: any tensor; only used to place the layer in a functional
            graph. Its values are ignored.

    Returns:
        The table, shape `(head_dim, max_span)`, in the compute dtype.

    Example:

    >>> layer = RelativePosition(head_dim=16, max_span=64)
    >>> table = layer(keras.ops.zeros((2, 8, 32)))
    >>> tuple(table.shape)
    (16, 64)

    References:
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1907.01470),
          "Augmenting Self-attention with Persistent Memory", §3.
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1905.07799),
          "Adaptive Attention Span in Transformers".
    """

    def __init__(self, head_dim, max_span, initializer="random_normal", **kwargs):
        super().__init__(**kwargs)
        self.head_dim = check_positive("head_dim", head_dim)
        self.max_span = check_positive("max_span", max_span)
        if initializer == "random_normal":
            initializer = keras.initializers.RandomNormal(stddev=1.0)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape=None):
        self.table = self.add_weight(
            name="table",
            shape=(self.head_dim, self.max_span),
            initializer=self.initializer,
        )
        self.built = True

    def call(self, inputs=None):
        return keras.ops.cast(self.table, self.compute_dtype)

    def compute_output_shape(self, input_shape=None):
        return (self.head_dim, self.max_span)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "head_dim": self.head_dim,
                "max_span": self.max_span,
                "initializer": keras.initializers.serialize(self.initializer),
            }
        )
        return config
