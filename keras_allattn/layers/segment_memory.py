import keras
from keras import ops

from keras_allattn.utils import check_positive
from keras_allattn.utils import check_shape


@keras.saving.register_keras_serializable(package="keras_allattn")
class SegmentMemory(keras.layers.Layer):
    """The segment memory of one layer, carried from batch to batch.

    Holds, for each of `batch_size` streams, the inputs of its attention
    layer for the last `memory_length` tokens, in a non-trainable variable.
    Each call returns the memory as it was before the call and stores the
    next one (the last `memory_length` rows of `[memory; inputs]`, gradients
    stopped). This is how the memory crosses batches inside `fit`,
    `evaluate` and `predict`, compiled or not; consecutive batches must
    therefore continue the same streams row by row.

    Args:
        batch_size: int, the number of streams (the static batch size).
        memory_length: int, rows kept per stream (the maximum span).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(batch_size, M, d)` hidden states of the current block.

    Returns:
        `(batch_size, memory_length, d)` the memory before this block.

    Example:

    >>> memory = SegmentMemory(batch_size=2, memory_length=4)
    >>> x = keras.ops.ones((2, 3, 8))
    >>> tuple(memory(x).shape)
    (2, 4, 8)

    References:
        - [Dai et al., 2019](https://arxiv.org/abs/1901.02860),
          "Transformer-XL", segment-level recurrence.
    """

    def __init__(self, batch_size, memory_length, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = check_positive("batch_size", batch_size)
        self.memory_length = check_positive("memory_length", memory_length)

    def build(self, inputs_shape):
        check_shape("inputs", inputs_shape, ("batch_size", "length", "width"))
        if inputs_shape[-1] is None:
            raise ValueError(
                "The width of `inputs` (last axis) must be known to build "
                f"the memory. Received: inputs.shape={tuple(inputs_shape)}"
            )
        self.memory = self.add_weight(
            name="memory",
            shape=(self.batch_size, self.memory_length, inputs_shape[-1]),
            initializer="zeros",
            trainable=False,
            dtype=self.compute_dtype,
        )
        self.built = True

    def next_memory(self, memory, inputs):
        """The memory after `inputs`: last rows of `[memory; inputs]`."""
        joined = ops.concatenate([ops.cast(memory, inputs.dtype), inputs], 1)
        return ops.stop_gradient(joined[:, joined.shape[1] - self.memory_length :])

    def call(self, inputs):
        check_shape(
            "inputs", inputs.shape, ("batch_size", "length", self.memory.shape[-1])
        )
        batch = inputs.shape[0]
        if batch is not None and batch != self.batch_size:
            raise ValueError(
                f"Every batch must hold `batch_size`={self.batch_size} streams "
                "(the segment memory has one row per stream; batch with "
                f"drop_remainder=True). Received: a batch of size {batch}"
            )
        memory = ops.cast(self.memory, inputs.dtype)
        if keras.backend.backend() == "torch":
            # torch assigns in place: keep the old value apart from the
            # variable's storage before overwriting it.
            memory = ops.copy(memory)
        self.memory.assign(
            ops.cast(self.next_memory(memory, inputs), self.memory.dtype)
        )
        return memory

    def reset(self):
        """Zeroes the memory of every stream."""
        self.memory.assign(ops.zeros(self.memory.shape, self.memory.dtype))

    def compute_output_shape(self, inputs_shape):
        return (self.batch_size, self.memory_length, inputs_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {"batch_size": self.batch_size, "memory_length": self.memory_length}
        )
        return config
