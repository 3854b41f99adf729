import math

import keras
import numpy as np
from keras import ops

from keras_allattn.ops.attention import apply_span_mask
from keras_allattn.ops.attention import span_mask
from keras_allattn.utils import check_positive
from keras_allattn.utils import check_unit_interval


@keras.saving.register_keras_serializable(package="keras_allattn")
class ClipToUnitInterval(keras.constraints.Constraint):
    """Keeps a weight inside [0, 1] after every optimizer update."""

    def __call__(self, w):
        return ops.clip(w, 0.0, 1.0)


@keras.saving.register_keras_serializable(package="keras_allattn")
class AdaptiveSpan(keras.layers.Layer):
    """Adaptive attention span: a learned soft mask over distances per head.

    Every head `h` learns a span ratio `z_h` in [0, 1]. Attention weights at
    distance `r` are multiplied by the soft mask
    `m(r) = clip((R + z_h * L - r + 1) / R, 0, 1)` (`L` = `max_span`,
    `R` = `span_ramp`), so a head attends to about `z_h * L + R` tokens and
    the cost of attention can follow the learned spans. The ratios are kept
    in [0, 1] by a weight constraint, and the layer adds the span loss
    `span_loss_coeff * L * mean(z)` through `add_loss` each time it is
    called.

    Args:
        num_heads: int, the number of heads `H`.
        max_span: int, the maximum span `L`.
        span_ramp: int, the width `R` of the mask's linear ramp.
        span_init: float in [0, 1], the initial ratio of every head.
        span_loss_coeff: float >= 0, the weight of the span loss.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: attention weights of shape `(..., H, M, A)` with `A <=
            max_span`, column `c` holding distance `A - c` (the most recent
            token last). Weights for the `max_span - A` oldest distances are
            taken to be absent (trimmed, which is exact when their mask is 0).
        normalize: bool, whether to renormalise the masked weights over the
            last axis (by their sum plus 1e-8), as done when no persistent
            vectors share the softmax. Default True.

    Returns:
        The masked (and optionally renormalised) weights, same shape as
        `inputs`.

    Example:

    >>> layer = AdaptiveSpan(num_heads=2, max_span=64, span_init=0.25)
    >>> weights = keras.ops.softmax(keras.random.normal((1, 2, 4, 64)))
    >>> masked = layer(weights)
    >>> layer.current_spans().tolist()
    [48, 48]

    References:
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1905.07799),
          "Adaptive Attention Span in Transformers".
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1907.01470),
          "Augmenting Self-attention with Persistent Memory".
    """

    def __init__(
        self,
        num_heads,
        max_span,
        span_ramp=32,
        span_init=0.0,
        span_loss_coeff=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_positive("num_heads", num_heads)
        self.max_span = check_positive("max_span", max_span)
        self.span_ramp = check_positive("span_ramp", span_ramp)
        self.span_init = check_unit_interval("span_init", span_init)
        if not span_loss_coeff >= 0:
            raise ValueError(
                "`span_loss_coeff` must be a non-negative number. "
                f"Received: span_loss_coeff={span_loss_coeff!r}"
            )
        self.span_loss_coeff = float(span_loss_coeff)

    def build(self, input_shape=None):
        self.span_ratio = self.add_weight(
            name="span_ratio",
            shape=(self.num_heads,),
            initializer=keras.initializers.Constant(self.span_init),
            constraint=ClipToUnitInterval(),
            # Read in float32 also under mixed precision: a bfloat16 ratio
            # would move the span by up to L / 512 tokens (16 at L = 8192),
            # and a recomputation outside the layer's autocast scope
            # (remat) must read the same dtype as the forward pass did.
            autocast=False,
        )
        self.built = True

    def mask(self, length):
        """The soft mask `(H, length)` over the `length` latest distances."""
        return span_mask(self.span_ratio, self.max_span, self.span_ramp, length)

    def span_loss(self):
        """`span_loss_coeff * max_span * mean(z)`, a float32 scalar."""
        ratio = ops.cast(self.span_ratio, "float32")
        return self.span_loss_coeff * self.max_span * ops.mean(ratio)

    def add_span_loss(self):
        """Adds the span loss to the layer's losses when its weight is > 0."""
        if self.span_loss_coeff > 0:
            self.add_loss(self.span_loss())

    def call(self, inputs, normalize=True):
        shape = tuple(inputs.shape)
        length = shape[-1] if shape else None
        if (
            len(shape) < 3
            or shape[-3] not in (None, self.num_heads)
            or length is None
            or length > self.max_span
        ):
            raise ValueError(
                f"`inputs` must have shape (..., num_heads={self.num_heads}, "
                f"queries, A) with A <= max_span={self.max_span}. "
                f"Received: inputs.shape={shape}"
            )
        mask = ops.cast(self.mask(length), inputs.dtype)[:, None, :]
        weights = apply_span_mask(inputs, mask, normalize)  # (..., H, M, A)
        self.add_span_loss()
        return weights

    def current_spans(self):
        """Span of every head in tokens, `min(L, ceil(z * L) + R)`.

        Reads the weight's current value on the host: call it outside
        compiled functions.

        Returns:
            An int numpy array of shape `(num_heads,)`.
        """
        ratio = np.asarray(ops.convert_to_numpy(self.span_ratio), "float64")
        return spans_from_ratios(ratio, self.max_span, self.span_ramp)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "max_span": self.max_span,
                "span_ramp": self.span_ramp,
                "span_init": self.span_init,
                "span_loss_coeff": self.span_loss_coeff,
            }
        )
        return config


def spans_from_ratios(ratio, max_span, span_ramp):
    """Spans in tokens, `min(L, ceil(z * L) + R)`, of an array of ratios."""
    spans = [
        min(max_span, math.ceil(float(z) * max_span) + span_ramp)
        for z in np.ravel(ratio)
    ]
    return np.asarray(spans, dtype="int64").reshape(np.shape(ratio))
