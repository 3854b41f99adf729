"""Language-model metrics: bits per character/byte and perplexity."""

import math

import keras
from keras import ops


class _MeanTokenNLL(keras.metrics.Mean):
    """Mean negative log-likelihood in nats over all target tokens.

    `update_state(y_true, y_pred, sample_weight=None)` takes integer targets
    `(batch, ...)` and logits `(batch, ..., vocabulary)`; every token counts
    once, or with its weight: `sample_weight` is per token or per leading
    axes (e.g. per sequence), broadcast over the rest.
    """

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "int32")
        nll = keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=True
        )
        # keras.metrics.Mean averages per sample first; flatten so that the
        # mean runs over tokens.
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, nll.dtype)
            while len(sample_weight.shape) < len(nll.shape):
                sample_weight = ops.expand_dims(sample_weight, -1)
            sample_weight = ops.reshape(
                ops.broadcast_to(sample_weight, ops.shape(nll)), (-1,)
            )
        return super().update_state(
            ops.reshape(nll, (-1,)), sample_weight=sample_weight
        )


@keras.saving.register_keras_serializable(package="keras_allattn")
class BitsPerCharacter(_MeanTokenNLL):
    """Bits per character: mean negative log2-likelihood of the targets.

    Mean over all tokens of the batches seen (not a mean of batch means) of
    `-log2 p(target)`, from logits and sparse integer targets. It equals
    the mean cross-entropy in nats divided by `ln 2`.

    Args:
        name: string, the metric's name.
        dtype: the metric's variable dtype.

    Example:

    >>> metric = BitsPerCharacter()
    >>> metric.update_state([[0, 1]], [[[0.0, 0.0], [0.0, 0.0]]])
    >>> float(metric.result())
    1.0
    """

    def __init__(self, name="bits_per_character", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def result(self):
        return super().result() / math.log(2.0)


@keras.saving.register_keras_serializable(package="keras_allattn")
class BitsPerByte(BitsPerCharacter):
    """Bits per byte: `BitsPerCharacter` under its byte-level name.

    Args:
        name: string, the metric's name.
        dtype: the metric's variable dtype.
    """

    def __init__(self, name="bits_per_byte", dtype=None):
        super().__init__(name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_allattn")
class Perplexity(_MeanTokenNLL):
    """Perplexity: `exp` of the mean negative log-likelihood of the targets.

    The mean runs over all tokens of the batches seen, from logits and
    sparse integer targets.

    Args:
        name: string, the metric's name.
        dtype: the metric's variable dtype.

    Example:

    >>> metric = Perplexity()
    >>> metric.update_state([[0, 3]], [[[0.0] * 4, [0.0] * 4]])
    >>> round(float(metric.result()), 4)
    4.0
    """

    def __init__(self, name="perplexity", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def result(self):
        return ops.exp(super().result())
