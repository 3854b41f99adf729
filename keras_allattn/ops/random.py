"""Dropout driven by a seed tensor, so that recomputation repeats the mask.

`keras.random.dropout` accepts a seed tensor on JAX only; the attention is
recomputed under remat, and its dropout mask must then be drawn again from
the same seed. This module gives the other backends the same behaviour with
their own stateless generators.
"""

import keras
from keras import ops


def stateless_dropout(inputs, rate, seed):
    """Dropout whose mask is a pure function of `seed`.

    Args:
        inputs: the tensor to drop from.
        rate: float in [0, 1), the fraction of entries set to zero (the
            others are scaled by `1 / (1 - rate)`).
        seed: an integer seed tensor of shape (2,), e.g.
            `keras.random.SeedGenerator().next()`.

    Returns:
        A tensor like `inputs`.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return keras.random.dropout(inputs, rate, seed=seed)
    keep = 1.0 - rate
    if backend == "tensorflow":
        import tensorflow as tf

        noise = tf.random.stateless_uniform(
            tf.shape(inputs), seed=tf.cast(seed, "int64"), dtype=inputs.dtype
        )
    elif backend == "torch":
        import torch

        generator = torch.Generator(device=inputs.device)
        generator.manual_seed(int(seed[0]) * 2**32 + int(seed[1]))
        noise = torch.rand(
            inputs.shape, generator=generator, device=inputs.device
        ).to(inputs.dtype)
    else:
        raise ValueError(
            f"Unsupported backend. Received: backend={backend!r}"
        )
    return ops.where(noise < keep, inputs / keep, ops.zeros_like(inputs))
