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
    compiled or not; consecutive batches must therefore continue the same
    streams row by row.

    The memory is state, not a weight: it is in `layer.variables` (so the
    backends' training loops carry it from step to step) but not in
    `layer.weights`, so `count_params()`, `get_weights()`, `.keras` files
    and `save_weights()` leave it out, and a loaded layer starts from zero
    memory. `snapshot()` and `restore()` keep it aside and put it back
    (what `AllAttentionLM` does around `evaluate` and `predict`, and the
    training checkpoints through `get_memory()` and `set_memory()`).

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

    @property
    def weights(self):
        # The memory is activations of the streams, not a parameter.
        return []

    def save_own_variables(self, store):
        """Saves nothing: the memory is state, not a weight."""

    def load_own_variables(self, store):
        """Zeroes the memory: a loaded model starts its streams afresh.

        Files written before the memory was left out hold it under "0";
        it is ignored as well.
        """
        if self.built:
            self.reset()

    def snapshot(self):
        """The current memory, unaffected by later updates (see `restore`).

        Under a `tf.distribute` strategy, one value per replica (each
        replica holds the memory of its own rows).
        """
        value = self.memory.value
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if isinstance(value, tf.distribute.DistributedValues):
                local = value.distribute_strategy.experimental_local_results
                return [tf.identity(part) for part in local(value)]
        if keras.backend.backend() == "jax":
            return value  # immutable: no copy needed
        return ops.copy(value)

    def restore(self, snapshot):
        """Puts back a memory taken with `snapshot()`."""
        if isinstance(snapshot, list):
            value = self.memory.value
            local = value.distribute_strategy.experimental_local_results
            for part, kept in zip(local(value), snapshot):
                part.assign(kept)
            return
        self.memory.assign(snapshot)

    def compute_output_shape(self, inputs_shape):
        return (self.batch_size, self.memory_length, inputs_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {"batch_size": self.batch_size, "memory_length": self.memory_length}
        )
        return config
