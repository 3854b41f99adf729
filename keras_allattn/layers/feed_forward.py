import keras
import numpy as np

from keras_allattn.utils import check_positive
from keras_allattn.utils import check_last_axis
from keras_allattn.utils import check_rate
from keras_allattn.utils import torch_default_uniform


@keras.saving.register_keras_serializable(package="keras_allattn")
class FeedForward(keras.layers.Layer):
    """The Transformer feed-forward sublayer `W2 dropout(relu(W1 x + b1)) + b2`.

    The all-attention network has none; the baseline Transformer layer of
    the paper's comparison keeps it.

    Args:
        feedforward_dim: int, the inner width.
        dropout: float in [0, 1), dropout after the ReLU.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(..., d)` hidden states (`d` fixed when the layer is
            built; another width raises `ValueError`).
        training: bool, whether dropout is active.

    Returns:
        `(..., d)` outputs (before the residual connection).

    Example:

    >>> layer = FeedForward(feedforward_dim=64)
    >>> tuple(layer(keras.ops.ones((2, 3, 16))).shape)
    (2, 3, 16)

    References:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762),
          "Attention Is All You Need".
    """

    def __init__(self, feedforward_dim, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.feedforward_dim = check_positive("feedforward_dim", feedforward_dim)
        self.dropout = check_rate("dropout", dropout)

    def build(self, inputs_shape):
        check_last_axis("inputs", inputs_shape, None)
        hidden_dim = inputs_shape[-1]
        self.hidden_dim = hidden_dim
        self.inner_dense = keras.layers.Dense(
            self.feedforward_dim,
            activation="relu",
            kernel_initializer=torch_default_uniform(hidden_dim),
            bias_initializer=torch_default_uniform(hidden_dim),
            dtype=self.dtype_policy,
            name="inner",
        )
        self.inner_dense.build(inputs_shape)
        self.dropout_layer = keras.layers.Dropout(
            self.dropout,
            seed=int(np.random.randint(2**31)),
            dtype=self.dtype_policy,
            name="dropout",
        )
        self.outer_dense = keras.layers.Dense(
            hidden_dim,
            kernel_initializer=torch_default_uniform(self.feedforward_dim),
            bias_initializer=torch_default_uniform(self.feedforward_dim),
            dtype=self.dtype_policy,
            name="outer",
        )
        self.outer_dense.build((*inputs_shape[:-1], self.feedforward_dim))
        self.built = True

    def call(self, inputs, training=None):
        check_last_axis("inputs", inputs.shape, self.hidden_dim)
        hidden = self.dropout_layer(self.inner_dense(inputs), training=training)
        return self.outer_dense(hidden)

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"feedforward_dim": self.feedforward_dim, "dropout": self.dropout}
        )
        return config
